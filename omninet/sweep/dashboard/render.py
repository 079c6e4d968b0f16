"""The dashboard page: every figure and table in one self-contained HTML file (plotly.js inlined
once), written atomically by :func:`build_dashboard`; ``omninet dashboard`` is :func:`dashboard_main`."""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from omninet.sweep.dashboard.data import SweepData, label, shared_configs
from omninet.sweep.dashboard.figures import parallel_figure, pareto_figure, pools_figure
from omninet.sweep.dashboard.generation import GENERATION_NOTE, generation_figure, generation_table
from omninet.sweep.dashboard.tables import (baseline_table, conditions_table, cost_model_table, noise_table,
                                            paired_table, pools_noise_table, recommendations_table, serving_table,
                                            table_html, unfinished_table)

__all__ = ["DEFAULT_NAME", "build_dashboard", "dashboard_main", "render"]

DEFAULT_NAME = "dashboard.html"

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; } .note { color: #666; font-style: italic; }
table.grid { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
table.grid th { background: #f4f4f4; }
.sim { background: #fff3cd; padding: 1px 6px; border-radius: 4px; }
"""


def _summary(sweep: SweepData) -> str:
    df = sweep.df
    repeat = df["repeat_of"].notna() if "repeat_of" in df else pd.Series(False, index=df.index)
    counts = df[~repeat].groupby(["pool", "status"]).size() if not df.empty else pd.Series(dtype=int)
    items = []
    for pool in sweep.pools:
        per = {s: int(n) for (p, s), n in counts.items() if p == pool}
        done = ", ".join(f"{n} {s}" for s, n in sorted(per.items())) or "no trials yet"
        repeats = int((repeat & (df["pool"] == pool)).sum()) if not df.empty else 0
        sim = " <span class='sim'>simulated</span>" if sweep.simulated[pool] else ""
        items.append(f"<li><b>{html.escape(pool)}</b>{sim}: {html.escape(done)} of "
                     f"{sweep.config.trials_for(sweep.config.pool(pool))} budgeted"
                     f"{f', plus {repeats} repeat runs (other seeds)' if repeats else ''}; "
                     f"non-dominated set from {html.escape(sweep.front_source[pool])}</li>")
    objectives = ", ".join(f"{label(k)} ({d})" for k, d in sweep.objectives)
    return (f"<p class='meta'>Results: <code>{html.escape(str(sweep.result.results_dir))}</code><br>"
            f"Objectives: {html.escape(objectives)}</p><ul>{''.join(items)}</ul>")


def _serving_html(sweep: SweepData) -> str:
    head, table = serving_table(sweep)
    if table.empty:
        return ""
    return (f"<h2 id='serving'>Serving (benchmarks/serving.py)</h2><p class='meta'>{html.escape(head)}</p>"
            + table_html(table, ""))


def _generation_html(sweep: SweepData, div: str) -> str:
    """The decoder trials' generation section; nothing for sweeps that measured none."""
    table = generation_table(sweep)
    if table.empty:
        return ""
    return (f"<h2 id='generation'>Generation (decoders): prefill, decode per token, KV cache</h2>"
            f"<p class='meta'>{html.escape(GENERATION_NOTE)}</p>{div}" + table_html(table, ""))


def render(sweep: SweepData) -> str:
    """The whole page. plotly.js is inlined once, with the first figure."""
    figures: list[tuple[str, Any]] = [("pareto", pareto_figure(sweep))]
    generation = generation_figure(sweep)
    if generation is not None:
        figures.append(("generation", generation))
    for pool in sweep.pools:
        fig = parallel_figure(sweep, pool)
        if fig is not None:
            figures.append((f"parallel-{pool}", fig))
    shared = shared_configs(sweep)
    if not shared.empty:
        figures.append(("pools", pools_figure(sweep, shared)))
    divs: dict[str, str] = {}
    for i, (name, fig) in enumerate(figures):
        divs[name] = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"plot-{name}",
                                 config={"displaylogo": False, "responsive": True})
    parallel = "".join(divs[n] for n, _ in figures if n.startswith("parallel-")) or \
        "<p class='note'>No finished trials yet.</p>"
    if shared.empty:
        pools_html = ("<p class='note'>No configuration was run on more than one pool. With identical "
                      "sampler seeds the first trials of every pool coincide; categorical search spaces repeat "
                      "configurations more often.</p>")
    else:
        keys = [k for k, _ in sweep.objectives]
        table = shared[["configuration", "pool", "trial_number"] + keys].rename(
            columns={"trial_number": "trial", **{k: label(k) for k in keys}})
        table["pool"] = [sweep.pool_title(p) for p in table["pool"]]
        pools_html = (divs["pools"] + table_html(table, "")
                      + "<p class='meta'>Raw times of two pools are taken at different moments; on a shared machine the "
                        "host's speed moves between them. Each pool's latency ratio to its own reference, timed side by "
                        "side, is what compares: on the same hardware, overlapping intervals mean the pools differ only "
                        "by noise.</p>" + table_html(pools_noise_table(sweep, shared), ""))
    title = f"OmniNet sweep {sweep.config.name}: trade-offs"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{_summary(sweep)}
<h2 id="pareto">Pareto fronts per pool</h2>
<p class="meta">Coloured: the pool's Pareto front over all objectives (feasible trials only). Grey: dominated.
Red crosses: ran but violate the pool's constraints. Dotted line: the front within that view.</p>
{divs['pareto']}
<h2 id="parallel">Parameters vs objectives</h2>
{parallel}
<h2 id="pools">Hardware pools side by side (same configuration)</h2>
{pools_html}
<h2 id="paired">Accuracy and speed against the reference, paired</h2>
<p class="meta">Every trial scores the same eval rows in the same order as its pool's reference run (the trained
base, or the dense baseline), so each accuracy is a paired difference with a 95% interval: 'eval' intervals are
a paired bootstrap over eval rows (one training run each), 'eval+seed' a t-interval over seed repeats.
Indistinguishable: the interval contains 0. Zero-shot: a derived trial right after its passes, before its
fine-tune. Speed-up: the reference's latency over the trial's, both timed side by side in the trial's worker
(alternating short rounds, the same inputs and threads), with a 95% interval on the median round; 'faster' or
'slower' only when the interval excludes 1, else 'indistinguishable'. Repeats combine their timing as
measurements.</p>
{table_html(paired_table(sweep), "No per-unit scores recorded (the runner keeps none, or no reference run finished).")}
{_generation_html(sweep, divs.get("generation", ""))}
<h2 id="baseline">What the knobs buy against the baseline</h2>
{table_html(baseline_table(sweep), "No baseline configuration (enqueue) finished.")}
<h2 id="recommended">Recommended configurations under the sweep's constraints</h2>
<p class="meta">Ranked by the pessimistic end of the first objective's 95% interval (repeated seeds; a
configuration run once borrows the pooled spread of the repeated ones).</p>
{table_html(recommendations_table(sweep), "No pools.")}
<h2 id="noise">Noise: configurations run with several seeds</h2>
{table_html(noise_table(sweep), "No configuration was repeated (set repeats.count >= 2).")}
<h2 id="conditions">Measurement conditions</h2>
{table_html(conditions_table(sweep), "No pools.")}
<h2 id="unfinished">Trials that did not finish (failed, crashed, infeasible, screened, pruned)</h2>
<p class="meta">screened: stopped before training (measured first, or predicted by the cost model); pruned: stopped
at a rung of successive halving, with its accuracy at that rung.</p>
{table_html(unfinished_table(sweep), "Every trial finished and was measured.")}
<h2 id="cost-model">Cost model</h2>
{table_html(cost_model_table(sweep), "No cost model (cost_model.enabled: false).")}
{_serving_html(sweep)}
</body></html>
"""


def build_dashboard(results_dir: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Path:
    """Writes the trade-off dashboard of the sweep in ``results_dir`` to ``out`` (default
    ``<results_dir>/artifacts/dashboard.html``, which the sweep logs to MLflow) and returns
    its path. Raises ``ValueError`` (one line) when ``results_dir`` is not a sweep's results
    directory or ``out`` is a directory."""
    path = Path(os.path.expanduser(str(results_dir)))
    if not path.is_dir():
        raise ValueError(f"results_dir: {str(path)!r} is not a directory; pass a sweep's results directory "
                         "(the one holding sweep.yaml and trials/)")
    target = Path(os.path.expanduser(str(out))) if out is not None else path / "artifacts" / DEFAULT_NAME
    if target.is_dir():
        raise ValueError(f"out: {str(target)!r} is a directory; give a file path such as {target / DEFAULT_NAME}")
    page = render(SweepData(path))  # all reading and plotting before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target.resolve()


def dashboard_main(argv: list[str]) -> int:
    """``omninet dashboard RESULTS_DIR [--out FILE]``: exit 0 and the file's path on stdout;
    exit 2 with one line on stderr on bad input."""
    parser = argparse.ArgumentParser(prog="omninet dashboard",
                                     description="(Re)build a sweep's trade-off dashboard: one self-contained HTML file.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's results directory (holds sweep.yaml)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help=f"where to write the HTML (default RESULTS_DIR/artifacts/{DEFAULT_NAME})")
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        path = build_dashboard(args.results_dir, out=args.out)
    except ValueError as exc:
        print(f"omninet dashboard: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0
