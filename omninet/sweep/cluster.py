"""The cluster a sweep runs on: Ray started or joined, each pool probed on a node that has its
resources, and each pool's search space trimmed to what its hardware can run. Everything here
fails fast, before any record is written."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omninet.attention.registry import fit_search_param
from omninet.sweep.config import SweepConfig, SweepConfigError

__all__ = ["Probed", "start_ray", "embedded_args", "probe_pools", "keep_reference", "check_cores", "space_for",
           "fmt_resources"]

log = logging.getLogger("omninet.sweep")
PROBE_TIMEOUT_S = 600


@dataclass
class Probed:
    """What probing found: per pool, whether its accelerator is simulated on CPU, the probe's
    record (``probe.json``) and the search space its hardware runs."""

    simulated: dict[str, bool] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, list] = field(default_factory=dict)

    def calibration_ms(self, pool: str) -> float | None:
        return self.info.get(pool, {}).get("calibration_ms")


def start_ray(config: SweepConfig, address: str | None, num_cpus: int | None) -> tuple[bool, bool]:
    """Joins ``address`` (or ``$RAY_ADDRESS``), else starts an embedded local Ray. Returns
    (whether this call started Ray, whether it is embedded)."""
    import ray  # heavy: ray

    address = address or os.environ.get("RAY_ADDRESS")
    owns = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
            log.info("connected to Ray cluster at %s", address)
        else:
            ray.init(**embedded_args(config, num_cpus))
            log.info("started an embedded local Ray: %s", fmt_resources(ray.cluster_resources()))
        owns = True
    return owns, not address


def embedded_args(config: SweepConfig, num_cpus: int | None) -> dict[str, Any]:
    cpus = sum(p.concurrency * p.resources.get("CPU", 1.0) for p in config.pools)
    args: dict[str, Any] = {
        "address": "local",  # a new embedded instance, never a cluster left in /tmp/ray
        "num_cpus": num_cpus or max(os.cpu_count() or 1, math.ceil(cpus)),
        "include_dashboard": False, "log_to_driver": True, "_node_ip_address": "127.0.0.1",
    }
    if config.simulate_accelerators:  # declare the pools' accelerators so Ray can schedule them
        need: dict[str, float] = {}
        for p in config.pools:
            for key, amount in p.resources.items():
                if key != "CPU":
                    need[key] = need.get(key, 0.0) + amount * p.concurrency
        if "GPU" in need:
            args["num_gpus"] = math.ceil(need.pop("GPU"))
        if need:
            args["resources"] = need
    return args


def probe_pools(config: SweepConfig, results_dir: Path, remote_probe, *, embedded: bool) -> Probed:
    """Fails fast, before anything is written, when a pool cannot run: its resources are
    missing from the cluster, or its accelerator is not physically present and the config does
    not ask to simulate it."""
    import ray  # heavy: ray

    have = ray.cluster_resources()
    refs = {}
    for p in config.pools:
        missing = {k: v for k, v in p.resources.items() if have.get(k, 0.0) < v}
        if missing and embedded:
            hint = ("set simulate_accelerators: true to simulate it on CPU" if p.accelerator
                    else "start Ray with these custom resources or pass --address of a cluster that has them")
            raise SweepConfigError(f"pools[{p.name}]: no node offers {missing} (cluster has "
                                   f"{fmt_resources(have)}); {hint}")
        if missing:
            log.warning("pool %s: no node offers %s yet; waiting for one (autoscaler?)", p.name, missing)
        refs[p.name] = remote_probe.options(**p.ray_options(), max_retries=1).remote(
            p.accelerator, threads=max(1, int(p.resources.get("CPU", 1))))
    out = Probed()
    for name, ref in refs.items():
        pool = config.pool(name)
        try:
            info = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise SweepConfigError(f"pools[{name}]: no node with {pool.resources} appeared within "
                                   f"{PROBE_TIMEOUT_S} s") from None
        out.simulated[name] = not info["present"]
        if not info["present"] and not config.simulate_accelerators:
            raise SweepConfigError(
                f"pools[{name}]: needs a {pool.accelerator} but node {info['node']} has none ({info['detail']}); "
                "run on a node with one, or set simulate_accelerators: true to run it on CPU (tagged simulated)")
        out.info[name] = keep_reference(results_dir, name, info)
        out.params[name] = space_for(config, pool, info)
    check_cores(config, out.info, embedded)
    return out


def keep_reference(results_dir: Path, name: str, info: dict[str, Any]) -> dict[str, Any]:
    """A resumed sweep keeps the pool's first reference speed (probe.json), so every trial of
    the pool, before and after the resume, has its normalized latency on one scale."""
    try:
        earlier = json.loads((results_dir / "probe.json").read_text()).get(name, {})
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("calibration_ms"):
        info = {**info, "calibration_ms_now": info.get("calibration_ms"), "calibration_ms": earlier["calibration_ms"]}
    return info


def check_cores(config: SweepConfig, probes: dict[str, dict[str, Any]], embedded: bool) -> None:
    """Concurrent trials get disjoint cores: a pool (or, on one embedded node, all pools)
    asking for more trial CPUs at once than a node has physical cores is refused."""
    if config.oversubscribe:
        return

    def cores_of(p) -> int:
        return p.concurrency * max(1, math.ceil(p.resources.get("CPU", 1.0)))

    for p in config.pools:
        cores = probes[p.name].get("physical_cores") or 1
        want = cores_of(p)
        if want > cores:
            raise SweepConfigError(
                f"pools[{p.name}]: concurrency {p.concurrency} x {p.resources.get('CPU', 1.0):g} CPU needs {want} cores "
                f"but node {probes[p.name]['node']} has {cores}; lower concurrency or set oversubscribe: true "
                "(measurements then share cores)")
    if embedded:
        cores = min(info.get("physical_cores") or 1 for info in probes.values())
        want = sum(cores_of(p) for p in config.pools)
        if want > cores:
            raise SweepConfigError(
                f"pools: together {want} concurrent trial CPUs on this machine's {cores} cores; lower the pools' "
                "concurrency or set oversubscribe: true (measurements then share cores)")


def space_for(config: SweepConfig, pool, info: dict[str, Any]) -> list:
    """The search space this pool's hardware can run: precision choices the probed device has
    no native support for are removed (``allow_emulated: true`` keeps them), and each kernel's
    rule at the measured length is applied (Linformer: k <= N), each with one log line and a
    record in ``<results>/probe.json`` (``info['search_space_notes']``)."""
    caps = info.get("capabilities") or {}
    native = caps.get("native_precisions")
    refused = caps.get("refused") or {}
    seq = config.runner.seq_length(config.trial)
    out, notes = [], []
    for param in config.params:
        if param.path == "hardware.precision" and native is not None and not config.allow_emulated:
            keep = [c for c in param.choices if c in native or c == "auto"]
            dropped = [c for c in param.choices if c not in keep]
            reasons = "; ".join(f"{c}: {refused.get(c, 'not native here')}" for c in dropped)
            if dropped:
                notes.append(f"removed hardware.precision {dropped} ({reasons})")
            if not keep:
                raise SweepConfigError(f"pools[{pool.name}]: no hardware.precision choice runs natively on "
                                       f"{caps.get('device_name')} ({reasons}); add fp32 or set allow_emulated: true")
            param = dataclasses.replace(param, choices=keep) if dropped else param
        if seq:
            try:
                param, fitted = fit_search_param(param, seq)
            except ValueError as exc:
                raise SweepConfigError(f"search_space.{param.path}: {exc}") from None
            notes += fitted
        out.append(param)
    for note in notes:
        log.info("pool %s: %s", pool.name, note)
    info["search_space_notes"] = notes
    return out


def fmt_resources(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items()))
