"""Run or resume a sweep.

    python sweeps/run.py --config sweeps/quickstart.yaml            # embedded local Ray
    ray job submit --working-dir . -- python sweeps/run.py --config sweeps/full.yaml

Without ``--address`` and ``$RAY_ADDRESS`` an embedded local Ray is started; under ``ray job
submit`` the driver joins the cluster. Rerunning the same command resumes. A bad config or a
pool the cluster cannot run exits with status 2 and one line on stderr, with nothing written.
Same as ``omninet sweep``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from omninet.sweep.cli import sweep_main

    return sweep_main(argv, prog="sweeps/run.py")


if __name__ == "__main__":
    sys.exit(main())
