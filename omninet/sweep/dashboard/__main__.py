"""``python -m omninet.sweep.dashboard RESULTS_DIR [--out FILE]``: the same as ``omninet dashboard``."""

import sys

from omninet.sweep.dashboard.render import dashboard_main

raise SystemExit(dashboard_main(sys.argv[1:]))
