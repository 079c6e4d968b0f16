"""``omninet``: one command, several subcommands.

    omninet info                         devices, precisions and kernels available here
    omninet trial --config X.yaml        train, evaluate and measure one configuration
    omninet sweep --config S.yaml        run a multi-objective sweep (same as sweeps/run.py)
    omninet recommend RESULTS_DIR ...    the best configuration under your budget
    omninet dashboard RESULTS_DIR        (re)build the trade-off dashboard of a sweep

Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys


class UsageError(Exception):
    """Bad input from the command line: one line, exit status 2."""


def _info(args) -> int:
    import torch

    from omninet.attention import KERNELS

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": sorted(KERNELS)}
    try:
        from omninet.hardware import describe_backends

        out["backends"] = describe_backends()
    except ImportError:
        pass
    print(json.dumps(out, indent=2, default=str))
    return 0


def _delegate(module: str, func: str):
    """Subcommands whose implementation lives with its feature; imported only when used."""

    def run(args) -> int:
        return getattr(importlib.import_module(module), func)(args.rest)

    return run


SUBCOMMANDS = {
    "info": (_info, "devices, precisions and attention kernels available on this machine"),
    "trial": (_delegate("omninet.trial", "trial_main"), "train, evaluate and measure one configuration (--config X.yaml)"),
    "sweep": (_delegate("omninet.sweep.cli", "sweep_main"), "run a multi-objective sweep (--config sweeps/quickstart.yaml)"),
    "recommend": (_delegate("omninet.sweep.cli", "recommend_main"), "best configuration of a finished sweep under a budget"),
    "dashboard": (_delegate("omninet.sweep.cli", "dashboard_main"), "(re)build a sweep's trade-off dashboard HTML"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omninet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=name == "info")
        if name != "info":
            p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the subcommand (see omninet NAME --help)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return SUBCOMMANDS[args.command][0](args)
    except (UsageError, ValueError) as exc:
        print(f"omninet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
