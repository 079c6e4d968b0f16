#!/usr/bin/env bash
# A local multi-node, heterogeneous Ray cluster on one machine, for trying
# `ray job submit` and the sweep platform without real accelerators. Everything binds to
# 127.0.0.1. Each node is a separate raylet with its own ports:
#   head     1 CPU                      (driver and Ray job supervisor)
#   cpu      1 CPU                      -> pools with {CPU: 1}
#   gpu      1 CPU + GPU: 1  (declared) -> pools with {GPU: 1}
#   tpu      1 CPU + TPU: 1  (declared) -> pools with {TPU: 1}
#   npu      1 CPU + NPU: 1  (declared) -> pools with {NPU: 1}
# Declared accelerators are not physically present here: sweeps run them only with
# `simulate_accelerators: true` (results tagged simulated). Usage:
#   platform/start_local_cluster.sh [start|stop]        (NODES="cpu gpu" to pick nodes)
# The Ray temp dir is the default /tmp/ray; the session name is kept in $STATE for `stop`.
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python sweeps/run.py --config sweeps/quickstart.yaml
set -euo pipefail

RAY=${RAY:-ray}
HOST=127.0.0.1
GCS_PORT=${GCS_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
NODES=${NODES:-"cpu gpu tpu npu"}

node_args() {  # distinct ports per raylet on the same IP
  local i=$1
  local base=$((20000 + i * 1000))
  echo "--node-ip-address=$HOST --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))" \
       "--min-worker-port=$((base + 100)) --max-worker-port=$((base + 999))" \
       "--dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))" \
       "--metrics-export-port=$((base + 5)) --runtime-env-agent-port=$((base + 6))"
}

STATE=${STATE:-${TMPDIR:-/tmp}/omninet-local-ray.session}

case "${1:-start}" in
  stop)
    # Stops only this cluster's processes (found by its session name), not every Ray on the
    # machine as `ray stop` would.
    [ -f "$STATE" ] || { echo "no cluster started by this script ($STATE missing)" >&2; exit 1; }
    session=$(cat "$STATE")
    pids=$(pgrep -f -- "$session" || true)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill -TERM $pids 2>/dev/null || true
      sleep 3
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
    rm -f "$STATE"
    # `ray.init()` without an address would otherwise try to join the stopped cluster
    if grep -qs ":$GCS_PORT\$" /tmp/ray/ray_current_cluster; then rm -f /tmp/ray/ray_current_cluster; fi
    echo "stopped Ray session $session"
    ;;
  start)
    export RAY_USAGE_STATS_ENABLED=0
    # Ray >= 2.5x enables token authentication for new clusters: every node (and every
    # `ray job submit`) uses the token in ~/.ray/auth_token, generated here if missing.
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    if [ "$RAY_AUTH_MODE" = token ]; then "$RAY" get-auth-token --generate >/dev/null; fi
    # shellcheck disable=SC2046
    "$RAY" start --head --port="$GCS_PORT" --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
      --num-cpus=1 --disable-usage-stats $(node_args 0)
    basename "$(readlink -f /tmp/ray/session_latest)" > "$STATE"  # this head's session name
    i=1
    for node in $NODES; do
      case "$node" in
        cpu) extra=(--num-cpus=1) ;;
        gpu) extra=(--num-cpus=1 --num-gpus=1) ;;
        tpu) extra=(--num-cpus=1 --resources='{"TPU": 1}') ;;
        npu) extra=(--num-cpus=1 --resources='{"NPU": 1}') ;;
        *) echo "unknown node kind $node (cpu, gpu, tpu, npu)" >&2; exit 2 ;;
      esac
      # shellcheck disable=SC2046
      "$RAY" start --address="$HOST:$GCS_PORT" "${extra[@]}" $(node_args "$i")
      i=$((i + 1))
    done
    "$RAY" status --address="$HOST:$GCS_PORT" || true
    echo "Ray cluster up: GCS $HOST:$GCS_PORT, dashboard/jobs http://$HOST:$DASHBOARD_PORT"
    ;;
  *)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
