"""Every benchmark's smoke mode runs and writes well-formed JSON (figures are not asserted:
speed targets are checked by running the benchmarks, never by timed unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {
    "dense_vs_torch": ["--quick", "--reps", "2"],
    "model_sparse": ["--quick"],
    "head_pruning": ["--smoke"],
    "precision": ["--smoke"],
    "int8_accuracy": ["--steps", "3", "--eval-examples", "32"],
    "qat": ["--quick"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_mode_writes_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMOKE[name], "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert isinstance(result, dict) and result
