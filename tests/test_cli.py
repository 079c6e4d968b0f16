"""The command line, as a user runs it (a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_backend_and_this_machine_capabilities():
    # Regression: `omninet info` imported a helper that did not exist, hid the ImportError and
    # so never listed a device.
    proc = subprocess.run([sys.executable, "-m", "omninet.cli", "info"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    backends = {b["backend"]: b for b in out["backends"]}
    assert backends["cpu"]["available"] is True and backends["cpu"]["ray_resource"] == "CPU"
    assert {"cuda", "rocm", "xpu", "tpu", "npu", "mps"} <= set(backends)
    caps = out["capabilities"]
    assert "fp32" in caps["native_precisions"] and backends[caps["backend"]]["available"] is True
    assert {"sdpa", "eager", "block_sparse", "linformer", "hybrid"} <= set(out["kernels"])
