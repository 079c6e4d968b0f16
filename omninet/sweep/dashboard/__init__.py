"""The trade-off dashboard of a sweep: one self-contained HTML file (Plotly, plotly.js inline).

    from omninet.sweep.dashboard import build_dashboard
    build_dashboard("~/omninet-results/quickstart")     # -> <results>/artifacts/dashboard.html
    omninet dashboard ~/omninet-results/quickstart      # the same from the shell

Built from a sweep's results directory (``sweep.yaml``, the Parquet trial table and the
Optuna studies, read through :class:`omninet.sweep.SweepResult`). Views, per pool:

1. Pareto fronts: the first objective (accuracy) against each cost (peak memory, latency p50).
   The non-dominated set is the pool study's own ``study.best_trials`` (Optuna, all
   objectives, constraint-aware); the front *within each 2-D view* is drawn as a line through
   the points Optuna finds non-dominated in those two objectives. Dominated trials are grey,
   trials that ran but violate the pool's constraints are red crosses, trials that never
   produced values (failed, crashed, infeasible by estimate) are listed in a table.
2. Parallel coordinates: searched parameters against the objectives.
3. Pools side by side: trials with identical searched parameters run on several pools.
4. Recommended configurations under the sweep's constraints (``SweepResult.recommendations``).
5. Generation (decoder sweeps): prefill, decode per token (and at several cache depths), decode
   throughput and the KV cache per configuration, with prefill and decode against the reference.

Pools whose accelerator was simulated on CPU are labelled "simulated" everywhere.

The package: ``data`` (what the views read, once, and shared formatting), ``figures``
(Plotly), ``tables`` (pandas frames and their HTML), ``generation`` (the decoder view), ``render`` (the page, ``build_dashboard``
and the ``omninet dashboard`` command).
"""

from omninet.sweep.dashboard.data import SweepData, config_label, label, non_dominated, shared_configs
from omninet.sweep.dashboard.figures import parallel_figure, pareto_figure, pools_figure
from omninet.sweep.dashboard.generation import generation_figure, generation_table
from omninet.sweep.dashboard.render import DEFAULT_NAME, build_dashboard, dashboard_main, render
from omninet.sweep.dashboard.tables import (baseline_table, conditions_table, cost_model_table, noise_table,
                                            paired_table, pools_noise_table, recommendations_table, serving_table,
                                            unfinished_table)

__all__ = ["build_dashboard", "dashboard_main", "DEFAULT_NAME", "SweepData", "label", "config_label", "non_dominated",
           "shared_configs", "pareto_figure", "parallel_figure", "pools_figure", "recommendations_table",
           "paired_table", "noise_table", "baseline_table", "conditions_table", "unfinished_table",
           "cost_model_table", "serving_table", "pools_noise_table", "render", "generation_table", "generation_figure"]
