"""The trained models a sweep keeps beside its records: the base every trial derives from
(``config.base``, trained once), each ok trial's model (policy ``keep_models``), and the
``pareto`` pruning and MLflow logging of them at the end. The format is :mod:`omninet.artifacts`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from omninet.artifacts import model_subdir, prune_models, trial_identity, write_trial_model
from omninet.interop.convert import import_checkpoint
from omninet.interop.hf import copy_tokenizer_files
from omninet.model import OmniNetModel
from omninet.sweep.config import SweepConfig, SweepConfigError

__all__ = ["prepare_base", "write_model", "keep_models"]

log = logging.getLogger("omninet.sweep")


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not isinstance(v, (list, dict, bytes))}


def prepare_base(config: SweepConfig, results_dir: Path, train: Callable[[Any, Any, float], dict[str, Any]]) -> Path | None:
    """``config.base``: the checkpoint as given, or the dense base trained once on the base pool
    (its first ``enqueue`` point, the trial's train section with ``base.train``) and kept in
    ``<results>/base``; a resumed sweep finds it there and does not train it again.
    ``train(pool, trial_config, cpus)`` runs one trial on the pool and returns its result."""
    spec = config.base
    if spec is None:
        return None
    if spec.checkpoint is not None:
        path = Path(os.path.expanduser(spec.checkpoint)).resolve()
        log.info("base: %s (checkpoint)", path)
        return path
    out = results_dir / "base"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        log.info("base: %s (%s by an earlier run of this sweep; not again)", out,
                 "converted" if spec.hf is not None else "trained")
        return out
    if spec.hf is not None:
        return _convert_base(Path(os.path.expanduser(spec.hf)).resolve(), out)
    pool = config.base_pool()
    point = dict(config.enqueue[0]) if config.enqueue else {}
    values = {**point, **{f"train.{k}": v for k, v in (spec.train or {}).items()}}
    trial = config.trial_config(values)
    cpus = spec.cpus or pool.concurrency * pool.resources.get("CPU", 1.0)
    log.info("base: training the dense base on pool %s (%g cores): %s", pool.name, cpus,
             ", ".join(f"{k}={v}" for k, v in values.items()))
    started = time.time()
    result = train(pool, trial, cpus)
    files = result.pop("_model_files", None)
    result.pop("_scores", None)
    if result.get("status") != "ok" or not files:
        raise SweepConfigError(f"base: training the base failed ({result.get('status')}: "
                               f"{str(result.get('error') or 'no model returned').splitlines()[0][:300]}); fix the "
                               "trial or base.train config, or give base.checkpoint")
    write_trial_model(files, out, trial_config=config.runner.to_dict(trial),
                      identity={"sweep": config.name, "pool": pool.name, "trial": "base"}, metrics=_scalars(result))
    first = config.objectives[0].key
    log.info("base: trained in %.0f s: %s %.4g (se %.2g), kept in %s", time.time() - started, first,
             result.get(first) or float("nan"), result.get("accuracy_se") or float("nan"), out)
    return out


def _convert_base(source: Path, out: Path) -> Path:
    """An HF folder or GGUF file as the sweep's OmniNet base folder, written whole or not at all
    (into a sibling folder, renamed when complete), so that resume never finds half a base."""
    started = time.time()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    import_checkpoint(source, partial)
    (partial / "imported_from.json").write_text(json.dumps({"source": str(source), "seconds": time.time() - started}))
    partial.rename(out)
    log.info("base: %s converted into %s in %.1f s", source, out, time.time() - started)
    return out


def write_model(files, results_dir: Path, config: SweepConfig, pool: str, number: int, row: dict[str, Any],
                result: dict[str, Any]) -> None:
    """An ok trial's trained model, next to the records (``models/pool=P/trial-N``)."""
    trial_config = json.loads(row["config_json"])
    write_trial_model(files, results_dir / model_subdir(pool, number), trial_config=trial_config,
                      identity=trial_identity(sweep=config.name, pool=pool, trial=number, trial_config=trial_config),
                      metrics={k: v for k, v in result.items() if not isinstance(v, (list, dict))})


def keep_models(config: SweepConfig, results_dir: Path, result, mlflow) -> None:
    """The ``keep_models`` policy at the end: ``pareto`` prunes each pool's model folders to its
    feasible front; every kept model is logged to its trial's MLflow run as a pyfunc model
    (registered as ``<sweep>.<pool>`` with ``register_models``)."""
    if config.keep_models == "none":
        return
    for pool in result.pools:
        if config.keep_models == "pareto":
            front = {int(n) for n in result.pareto_front(pool)["trial_number"]}
            removed = prune_models(results_dir, pool, front)
            if removed:
                log.info("pool %s: kept the models of the %d front trial(s), removed %d", pool, len(front), len(removed))
        folders = sorted((results_dir / "models" / f"pool={pool}").glob("trial-*"))
        mlflow.log_models(pool, folders, register=config.register_models)


def export_recommended(result, pool: str, out, *, hf_out=None, **limits) -> dict[str, Any]:
    """The recommended trial of ``pool`` (``SweepResult.recommend`` with ``limits``) written out:
    its kept model folder copied to ``out`` (an OmniNet trial-model folder, with the base's
    tokenizer files), and with ``hf_out`` also as a Hugging Face folder where HF can express it
    (dense kernels, one floating dtype; a one-line ValueError names the way out otherwise).
    Returns {trial_number, out, hf_out}."""
    row = result._recommend_row(pool, **limits)  # the row recommend() returns the config of, ranked once
    number, config = int(row["trial_number"]), json.loads(row["config_json"])
    kept = Path(result.results_dir) / model_subdir(pool, number)
    if not (kept / "model.safetensors").is_file():
        raise ValueError(f"recommend: trial #{number} of pool {pool!r} kept no model ({kept} is missing; keep_models: "
                         f"{result.config.keep_models}); rerun its config with `omninet trial --config` to get one")
    dst = Path(out).expanduser()
    shutil.copytree(kept, dst, dirs_exist_ok=True)
    base = Path(result.results_dir) / "base"
    if base.is_dir():
        copy_tokenizer_files(base, dst)
    written = {"trial_number": number, "out": str(dst), "hf_out": None}
    if hf_out is not None:
        precision = (config.get("hardware") or {}).get("precision") or "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"recommend: trial #{number} runs in {precision}, which has no Hugging Face form; its "
                             f"OmniNet folder is {dst} (or export it to ONNX with export_onnx)")
        model = OmniNetModel.from_pretrained(dst)
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32))
        written["hf_out"] = str(model.save_hf(Path(hf_out).expanduser(), tokenizer_from=dst))
    return written
