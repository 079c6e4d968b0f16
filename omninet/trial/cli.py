"""``omninet trial``: one trial from a YAML config, its result printed as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from omninet.paths import set_path
from omninet.trial.config import TrialConfig
from omninet.trial.runner import run_trial

__all__ = ["trial_main"]


def trial_main(argv: list[str] | None = None) -> int:
    """``omninet trial --config X.yaml [--set model.attention.kernel=linformer ...]``: prints the
    flat result as one JSON object. Exit status: 0 ok, 1 another trial status, 2 invalid config
    (one line on stderr, nothing run)."""
    parser = argparse.ArgumentParser(prog="omninet trial", description="Train, evaluate and measure one configuration.")
    parser.add_argument("--config", required=True, help="trial config YAML (sections task, model, train, hardware, measure)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a dotted key, e.g. --set train.max_seconds=10 (value parsed as YAML)")
    parser.add_argument("--memory-budget-mb", type=float, default=None, help="memory budget (infeasibility + run-time limit)")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the memory-estimate check: the run-time limit alone decides (oom instead of infeasible)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of sections (task, model, train, ...)")
        for item in args.set:
            path, sep, value = item.partition("=")
            if not (sep and path):
                raise ValueError(f"--set {item!r}: expected PATH=VALUE, e.g. train.steps=100")
            set_path(data, path, yaml.safe_load(value))
        cfg = TrialConfig.from_dict(data)
        for item in args.set:
            cfg.check_path(item.partition("=")[0], where="--set")
    except (OSError, yaml.YAMLError, ValueError) as exc:
        print(f"invalid trial config: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    result = run_trial(cfg, memory_budget_mb=args.memory_budget_mb, preflight=not args.no_preflight)
    text = json.dumps(result.to_dict())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if result.status == "invalid":
        print(f"invalid trial config: {result.error}", file=sys.stderr)
        return 2
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(trial_main())
