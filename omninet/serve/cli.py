"""``omninet serve``: serve a sweep's trained model over HTTP on Ray Serve.

    omninet serve RESULTS_DIR --pool cpu [--trial N] [--host 127.0.0.1] [--port 8000]
    omninet serve MODEL_DIR                      # a trial-model folder itself
    omninet serve RESULTS_DIR --pool cpu --write-config serve.yaml   # for `serve deploy` on a cluster

Without ``--address`` and ``$RAY_ADDRESS`` an embedded local Ray is started; under
``ray job submit`` the driver joins the cluster. The replica holds the pool's Ray resources
unless ``--num-cpus`` / ``--num-gpus`` say otherwise. Runs until Ctrl-C / SIGTERM, then shuts
Serve down gracefully (in-flight requests finish); ``--detach`` deploys and returns instead.
Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from omninet.artifacts import load_trial_model

__all__ = ["resolve_model", "serve_main"]


def resolve_model(target: str, pool: str | None, trial: int | None) -> tuple[Path, dict[str, float] | None]:
    """RESULTS_DIR + pool (+ trial) or a model folder -> (model folder, the pool's Ray resources).
    ValueError (one line) when something is missing."""
    path = Path(os.path.expanduser(target)).resolve()
    if not path.exists():
        raise ValueError(f"{target}: no such directory")
    if (path / "identity.json").is_file():  # a model folder itself
        load_trial_model(path)
        return path, None
    from omninet.sweep.results import SweepResult  # heavy: optuna, pyarrow (a model folder needs neither)

    result = SweepResult.load(path)
    if pool is None:
        raise ValueError(f"--pool is required for a results directory; pools are {result.pools}")
    folder = result.model_path(pool, trial)
    load_trial_model(folder)
    return folder, dict(result.config.pool(pool).resources)


def serve_main(argv: list[str] | None = None) -> int:
    import ray  # heavy: ray (resolve_model runs without it)
    from ray import serve  # heavy: ray

    from omninet.serve.app import (DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE,  # heavy: ray (Ray Serve)
                                   DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_BODY_BYTES, pool_actor_options, serve_config,
                                   serve_model)

    parser = argparse.ArgumentParser(prog="omninet serve", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="a sweep's results directory, or a trial-model folder")
    parser.add_argument("--pool", default=None, help="the pool whose model to serve")
    parser.add_argument("--trial", type=int, default=None, help="trial number (default: the pool's recommended trial)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="1 = batch-1 serving")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                        help="rows x bucket length per forward (caps batches of long inputs)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones get 413 unread (default 1 MiB)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads per replica")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default: the pool's)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: the pool's)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    parser.add_argument("--write-config", default=None, metavar="FILE", help="write a Serve config file and exit")
    parser.add_argument("--detach", action="store_true", help="deploy and return (the app keeps running on the cluster)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")

    folder, resources = resolve_model(args.results_dir, args.pool, args.trial)
    actor = pool_actor_options(resources or {"CPU": 1})
    if args.num_cpus is not None:
        actor["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        actor["num_gpus"] = args.num_gpus
    options: dict[str, Any] = {"num_replicas": args.replicas, "ray_actor_options": actor,
                               "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
                               "max_batch_tokens": args.max_batch_tokens, "max_body_bytes": args.max_body_bytes,
                               "num_threads": args.num_threads}
    if args.write_config:
        Path(args.write_config).write_text(yaml.safe_dump(serve_config(folder, host=args.host, port=args.port, **options),
                                                          sort_keys=False))
        print(f"wrote {args.write_config}; deploy with: serve deploy {args.write_config}")
        return 0

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)  # never attach to a cluster someone else started here
    url = serve_model(folder, host=args.host, port=args.port, **options)
    print(f"serving {folder} at {url}", flush=True)
    print(f"  curl -s -X POST {url}/predict -H 'Content-Type: application/json' -d '{{\"text\": \"[MAX 2 9 ]\"}}'",
          flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down (in-flight requests finish first)", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
