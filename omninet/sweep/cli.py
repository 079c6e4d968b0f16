"""Command-line entry points of the platform (``sweeps/run.py``, ``omninet sweep``,
``omninet recommend``). Bad input: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import sys
import tempfile

import yaml

from omninet.sweep.api import with_base
from omninet.sweep.config import SweepConfigError
from omninet.sweep.controller import run_sweep
from omninet.sweep.models import export_recommended
from omninet.sweep.results import SweepResult

__all__ = ["sweep_main", "recommend_main"]


def sweep_main(argv: list[str] | None = None, *, prog: str = "omninet sweep") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run or resume a multi-objective sweep. Without --address and $RAY_ADDRESS an "
        "embedded local Ray is started; under `ray job submit` the driver joins the cluster. Rerunning the "
        "same command resumes.")
    parser.add_argument("--config", required=True, help="sweep YAML (see sweeps/quickstart.yaml)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    parser.add_argument("--results-dir", default=None, help="overrides the config's results_dir")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--base", default=None, help="tune this model: a Hugging Face folder, a .gguf file or an "
                        "OmniNet folder (replaces the config's base; a text task without a tokenizer gets its own)")
    args = parser.parse_args(argv)

    try:
        config = args.config
        if args.base is not None:
            config = with_base(config, args.base, args.results_dir)
        result = run_sweep(config, results_dir=args.results_dir, address=args.address, num_cpus=args.num_cpus)
    except SweepConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {result.results_dir}")
    return 0


def recommend_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omninet recommend", description="The best trial config of a finished sweep for a pool, under the "
        "sweep's constraints and these limits; printed as YAML (a trial config for `omninet trial --config`).")
    parser.add_argument("results_dir", help="a sweep's results directory")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--max-latency-ms", type=float, default=None, help="bound on latency_p50_ms")
    parser.add_argument("--max-memory-mb", type=float, default=None, help="bound on peak_memory_train_mb")
    parser.add_argument("--min-accuracy", type=float, default=None)
    parser.add_argument("--max-latency-ratio", type=float, default=None,
                        help="bound on latency_ratio_ref (latency / the pool's reference, timed side by side)")
    parser.add_argument("--faster-than-reference", action="store_true",
                        help="only configurations whose latency ratio interval lies below 1")
    parser.add_argument("--out", default=None, help="write the YAML here instead of stdout")
    parser.add_argument("--model-out", default=None, help="also copy the recommended trial's kept model here")
    parser.add_argument("--hf-out", default=None, help="also write it as a Hugging Face folder here (dense kernels)")
    args = parser.parse_args(argv)

    result = SweepResult.load(args.results_dir)
    limits = dict(max_latency_ms=args.max_latency_ms, max_memory_mb=args.max_memory_mb, min_accuracy=args.min_accuracy,
                  max_latency_ratio=args.max_latency_ratio, faster_than_reference=args.faster_than_reference)
    config = result.recommend(args.pool, **limits)  # ValueError: one line, exit 2 (omninet.cli)
    if args.model_out or args.hf_out:
        with tempfile.TemporaryDirectory() as tmp:
            written = export_recommended(result, args.pool, args.model_out or tmp, hf_out=args.hf_out, **limits)
        print(f"# trial #{written['trial_number']}: " + ", ".join(f"{k} {v}" for k, v in written.items()
                                                                  if k != "trial_number" and v and v != tmp),
              file=sys.stderr)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0
