"""omninet: one command, several subcommands.

    omninet info                         devices, precisions and kernels available here
    omninet trial --config X.yaml        train, evaluate and measure one configuration
    omninet sweep --config S.yaml        run a multi-objective sweep (same as sweeps/run.py)
    omninet recommend RESULTS_DIR ...    the best configuration under your budget
    omninet dashboard RESULTS_DIR        (re)build the trade-off dashboard of a sweep
    omninet serve RESULTS_DIR --pool P   serve a pool's trained model over HTTP (Ray Serve)
    omninet import-hf SRC DST            a Hugging Face folder or GGUF file in as an OmniNet folder
    omninet export-hf SRC DST            an OmniNet folder out as a Hugging Face folder

Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from omninet.attention import KERNELS
from omninet.hardware import describe_backends, probe_capabilities


class UsageError(Exception):
    """Bad input from the command line: one line, exit status 2."""


def _info(args) -> int:
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": sorted(KERNELS),
           "backends": describe_backends(), "capabilities": probe_capabilities()}
    print(json.dumps(out, indent=2, default=str))
    return 0


def _delegate(module: str, func: str):
    """Subcommands whose implementation lives with its feature; imported only when used."""

    def run(args) -> int:
        return getattr(importlib.import_module(module), func)(args.rest)

    return run


SUBCOMMANDS = {
    "info": (_info, "devices, precisions and attention kernels available on this machine"),
    "trial": (_delegate("omninet.trial.cli", "trial_main"), "train, evaluate and measure one configuration (--config X.yaml)"),
    "sweep": (_delegate("omninet.sweep.cli", "sweep_main"), "run a multi-objective sweep (--config sweeps/quickstart.yaml)"),
    "recommend": (_delegate("omninet.sweep.cli", "recommend_main"), "best configuration of a finished sweep under a budget"),
    "dashboard": (_delegate("omninet.sweep.dashboard", "dashboard_main"), "(re)build a sweep's trade-off dashboard HTML"),
    "serve": (_delegate("omninet.serve.cli", "serve_main"), "serve a pool's trained model over HTTP (Ray Serve, dynamic batching)"),
    "import-hf": (_delegate("omninet.interop.cli", "import_main"), "a Hugging Face folder or GGUF file in as an OmniNet folder"),
    "export-hf": (_delegate("omninet.interop.cli", "export_main"), "an OmniNet folder out as a Hugging Face folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="omninet", description=__doc__.splitlines()[0],
                                     epilog="\n".join(f"  {n:<10} {h}" for n, (_, h) in SUBCOMMANDS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=sorted(SUBCOMMANDS), metavar="COMMAND")
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # --help, or an unknown command: argparse says so and exits 2
        parser.print_help()
        return 2
    command, rest = argv[0], argv[1:]
    try:
        return SUBCOMMANDS[command][0](argparse.Namespace(command=command, rest=rest))
    except (UsageError, ValueError) as exc:
        print(f"omninet {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
