"""A finished tiny sweep seen in a real headless Chromium (Debian's ``chromium``, driven over
the DevTools protocol, see tests/cdp.py): the trade-off dashboard renders with its plots
drawn and no console errors; ``mlflow ui`` serving the sweep's store shows the experiment
and its trial runs. Screenshots are kept under pytest's tmp_path (printed with -s)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from cdp import CHROMIUM
from omninet.sweep.localservers import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)"),
]

POOLS = {"cpu": 6, "gpu": 6}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A tiny sweep run end to end by the real entry point (sweeps/run.py: embedded Ray,
    Optuna, MLflow, Parquet) with the platform's toy trial function."""
    base = tmp_path_factory.mktemp("browser")
    results = base / "tiny"
    config = {
        "name": "tiny", "results_dir": str(results),
        "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": "omninet.sweep.testing:toy_estimate",
        "trial": {"toy": {}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": POOLS["cpu"]},
                  {"name": "gpu", "resources": {"GPU": 1, "CPU": 1}, "trials": POOLS["gpu"]}],
        "constraints": {"cpu": {"max_latency_ms": 4.0}, "gpu": {"max_memory_mb": 420}},
        "sampler": {"kind": "random", "seed": 0},  # each pool draws its own proposals (seed + pool index) ...
        "enqueue": [{"toy.x": 0.3, "toy.y": 1}],  # ... and both run the enqueued baseline: a shared configuration
        "simulate_accelerators": True, "progress_interval_s": 2.0,
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    # A Ray of its own: a cluster someone started here (ray start --head) must not be joined.
    # Ray finds a running cluster through <RAY_TMPDIR>/ray_current_cluster; short path: socket names.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path), "--num-cpus", "2"],
                              cwd=base, env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def test_dashboard_renders_plots_without_console_errors(sweep, chromium, tmp_path) -> None:
    from omninet.sweep.dashboard import build_dashboard

    page_path = build_dashboard(sweep, out=tmp_path / "dashboard.html")
    page = chromium.open(page_path.as_uri())
    drawn = page.wait_for("""(() => {
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        if (!plots.length || !plots.every(p => p._fullLayout && p.querySelector('.main-svg'))) return null;
        return {plots: plots.length,
                points: document.querySelectorAll('.scatterlayer .point').length,
                lines: document.querySelectorAll('.scatterlayer .js-line').length,
                bars: document.querySelectorAll('.barlayer .point').length,
                parcoords: document.querySelectorAll('.parcoords').length,
                parcoordsAxes: document.querySelectorAll('.parcoords .axis-title').length,
                text: document.body.innerText};
    })()""", timeout_s=90)
    shot = page.screenshot(tmp_path / "dashboard.png")
    errors = page.errors()
    print(f"\ndashboard screenshot: {shot}")
    assert errors == []
    assert drawn["plots"] == 1 + len(POOLS) + 1  # Pareto grid, parallel coordinates per pool, pools side by side
    assert drawn["points"] >= 2 * len(POOLS)  # every pool's markers, in both views
    assert drawn["lines"] >= 2 * len(POOLS)  # the front within each view
    assert drawn["bars"] >= 2 * 3  # a shared configuration, two pools, three objectives
    assert drawn["parcoords"] == len(POOLS) and drawn["parcoordsAxes"] >= 2 * 5
    text = drawn["text"]
    assert "gpu (simulated)" in text and "Recommended configurations" in text
    assert shot.stat().st_size > 50_000  # a drawn page, not a blank one


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@contextmanager
def serve(command: list[str], health_url: str, log_path: Path, *, env: dict | None = None, timeout_s: float = 180):
    """Runs a local web server (bound to 127.0.0.1 by ``command``) until ``health_url``
    answers 200; stops its whole process group afterwards."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(command, cwd=log_path.parent, env={**os.environ, **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(health_url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{command[0]} did not answer {health_url} within {timeout_s} s"
            time.sleep(0.25)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it spawned
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def mlflow_ui(sweep, tmp_path):
    """``mlflow ui`` on 127.0.0.1 serving the sweep's MLflow store."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{sweep / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    # no background job workers: they are for GenAI features and slow the start down; one
    # server worker (the default, 4, each importing MLflow, took most of the start on 2 cores)
    with serve(command, f"{url}/health", tmp_path / "mlflow-ui.log", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        yield url


def test_mlflow_ui_shows_the_experiment_and_trial_runs(sweep, mlflow_ui, chromium, tmp_path) -> None:
    experiments = _post(f"{mlflow_ui}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    experiment = next(e for e in experiments if e["name"] == "tiny")
    runs = _post(f"{mlflow_ui}/ajax-api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("omninet.role") == "parent"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    children = [(r, t) for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
    assert len(children) == sum(POOLS.values())
    assert {t["pool"] for _, t in children} == set(POOLS)
    assert all(t["simulated"] == "true" for _, t in children if t["pool"] == "gpu")
    measured = [r for r, t in children if t["status"] == "ok"]
    assert measured and all({"accuracy", "latency_p50_ms", "peak_memory_infer_mb"} <=
                            {m["key"] for m in r["data"]["metrics"]} for r in measured)

    child_names = [r["info"]["run_name"] for r, _ in children]
    page = chromium.open(f"{mlflow_ui}/#/experiments/{experiment['experiment_id']}/runs")
    parent_name = parents[0]["info"]["run_name"]
    page.wait_for(f"document.body.innerText.includes({json.dumps(parent_name)})", timeout_s=90)
    # child runs are nested under the sweep's parent run: expand it
    page.evaluate(f"""(() => {{
        const link = [...document.querySelectorAll('a')].find(a => a.innerText.trim() === {json.dumps(parent_name)});
        link.closest('[role=gridcell], .ag-cell-value').querySelector('button').click();
    }})()""")
    shown = page.wait_for(f"""(() => {{
        const names = new Set({json.dumps(child_names)});
        const n = [...document.querySelectorAll('a')].filter(a => names.has(a.innerText.trim())).length;
        return n >= names.size && n;
    }})()""", timeout_s=60)
    shot = page.screenshot(tmp_path / "mlflow-runs.png", full_page=False)
    text = page.evaluate("document.body.innerText")
    # the chart view: one chart per metric, a bar per trial run
    page.evaluate("document.querySelector('input[name=runs-view-mode][value=CHART]').click()")
    charts = page.wait_for("document.querySelectorAll('.js-plotly-plot .main-svg').length", timeout_s=60)
    chart_text = page.evaluate("document.body.innerText")
    chart_shot = page.screenshot(tmp_path / "mlflow-charts.png", full_page=False)
    print(f"\nMLflow UI screenshots: {shot} {chart_shot}")
    assert shown == len(child_names)
    assert "tiny" in text and f"{len(runs)} matching runs" in text
    assert charts > 0 and "accuracy" in chart_text and "Model metrics" in chart_text


def test_optuna_dashboard_reads_the_sweep_storage(sweep, chromium, tmp_path) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(VENV_BIN / "optuna-dashboard"), f"sqlite:///{sweep / 'optuna.db'}",
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    with serve(command, f"{url}/api/studies", tmp_path / "optuna-dashboard.log"):
        with urllib.request.urlopen(f"{url}/api/studies", timeout=30) as response:
            studies = {s["study_name"]: s for s in json.load(response)["study_summaries"]}
        assert set(studies) == {f"tiny.{pool}" for pool in POOLS}  # one study per pool
        study_id = studies["tiny.cpu"]["study_id"]
        page = chromium.open(f"{url}/dashboard/studies/{study_id}")
        text = page.wait_for("document.querySelectorAll('.js-plotly-plot .main-svg').length && "
                             "document.body.innerText.includes('Pareto Front') && document.body.innerText",
                             timeout_s=60)
        shot = page.screenshot(tmp_path / "optuna-dashboard.png", full_page=False)
        errors = page.errors()
    print(f"\noptuna-dashboard screenshot: {shot}")
    assert "Pareto Front" in text and "peak_memory_infer_mb" in text  # the sweep's metric names
    assert errors == []
