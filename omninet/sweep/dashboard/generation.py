"""The dashboard's generation view for decoder sweeps: per configuration, prefill (time to the
first token), decode per token at batch 1 (p50, and at cache depths N, 4N, 16N with the slope),
decode throughput at the measure batch and the KV cache's size, with prefill and decode against
the pool's reference (timed side by side in the trial's worker) where the trial was paired.
Empty for sweeps whose trials measured no generation (encoders, ``measure.generation: false``)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from omninet.sweep.dashboard.data import SweepData, config_label, fmt, label, present, ratio_interval

__all__ = ["generation_table", "generation_figure", "GENERATION_NOTE"]

GENERATION_NOTE = (
    "Decoder trials' generation, each at its own deployment length N: prefill of N tokens at batch 1 (last position's "
    "logits: time to the first token), decode per token at batch 1 (greedy, cache depths N-T .. N-1), at windows "
    "ending at depths N, 4N and 16N (capped at the model's max_seq_length; '-' where the cap left no new depth) and "
    "its slope, decode tokens/s at the measure batch, and the KV cache after N tokens at that batch. Against the "
    "reference: trial / reference per round, median with a 95% interval, prefill and decode each timed side by side "
    "with the reference's own; 'faster' or 'slower' only when the interval excludes 1.")


def _ratio_text(row: Any, key: str) -> str:
    """'0.912 [0.890, 0.934], faster': a ratio to the reference (below 1: faster) with its interval."""
    from omninet.sweep.results import speed_verdict

    r = ratio_interval(row, key)
    if r is None:
        return "-"
    ratio, lo, hi = r
    return f"{ratio:.3f} [{lo:.3f}, {hi:.3f}], {speed_verdict(lo, hi)}"


def _depths_text(row: Any) -> str:
    """'1.02 / 1.10 / 1.41 ms at 32 / 128 / 512': decode p50 at each measured depth."""
    ms = [row.get(f"decode_ms_{k}p") for k in (1, 4, 16)]
    depths = [row.get(f"decode_depth_{k}p") for k in (1, 4, 16)]
    if not any(present(v) for v in ms):
        return "-"
    cap = f" (cap {int(row['decode_depth_cap'])})" if present(row.get("decode_depth_cap")) else ""
    return (" / ".join(fmt(v) if present(v) else "-" for v in ms) + " ms at "
            + " / ".join(str(int(d)) if present(d) else "-" for d in depths) + cap)


def _rows(sweep: SweepData) -> pd.DataFrame:
    """Finished rows of every pool that measured generation, in pool order, fastest decode first."""
    parts = []
    for pool in sweep.pools:
        ran = sweep.ran(pool)
        if "decode_ms_p50" not in ran or ran.empty:
            continue
        ran = ran[ran["decode_ms_p50"].map(present)]
        parts.append(ran.sort_values(["decode_ms_p50", "trial_number"]))
    return pd.concat(parts) if parts else pd.DataFrame()


def generation_table(sweep: SweepData) -> pd.DataFrame:
    """One row per finished decoder trial with generation figures (see the module docstring)."""
    rows = []
    for _, row in _rows(sweep).iterrows():
        pool, number = row["pool"], int(row["trial_number"])
        out = {"pool": sweep.pool_title(pool), "trial": f"#{number}",
               "front": "yes" if number in sweep.fronts.get(pool, set()) else "",
               "configuration": config_label(sweep.params_of(row)),
               "N": fmt(row.get("seq_length")),
               label("prefill_ms_p50"): fmt(row["prefill_ms_p50"]) if present(row.get("prefill_ms_p50")) else "-",
               label("decode_ms_p50"): fmt(row["decode_ms_p50"]),
               label("decode_ms_p90"): fmt(row["decode_ms_p90"]) if present(row.get("decode_ms_p90")) else "-",
               "decode at depths": _depths_text(row),
               label("decode_ms_per_1k_depth"): fmt(row["decode_ms_per_1k_depth"])
               if present(row.get("decode_ms_per_1k_depth")) else "-",
               label("decode_tokens_s"): fmt(row["decode_tokens_s"]) if present(row.get("decode_tokens_s")) else "-",
               label("kv_cache_mb"): fmt(row["kv_cache_mb"]) if present(row.get("kv_cache_mb")) else "-",
               "KV batch": fmt(row.get("measure_batch_size")),
               "prefill / reference [95%]": _ratio_text(row, "prefill_ratio_ref"),
               "decode / reference [95%]": _ratio_text(row, "decode_ratio_ref")}
        rows.append(out)
    return pd.DataFrame(rows)


def generation_figure(sweep: SweepData):
    """Decode per token (p50) against the KV cache per trial, one trace per pool; the marker's
    hover gives prefill, decode throughput and the ratios to the reference. None without data."""
    import plotly.graph_objects as go

    df = _rows(sweep)
    if df.empty:
        return None
    fig = go.Figure()
    for pool, group in df.groupby("pool", sort=False):
        hover = [f"<b>{sweep.pool_title(pool)} #{int(r['trial_number'])}</b><br>{config_label(sweep.params_of(r))}<br>"
                 f"prefill p50 {fmt(r.get('prefill_ms_p50'))} ms<br>decode p50 {fmt(r['decode_ms_p50'])} ms/token<br>"
                 f"decode {fmt(r.get('decode_tokens_s'))} tokens/s<br>KV cache {fmt(r.get('kv_cache_mb'))} MB<br>"
                 f"decode / reference {_ratio_text(r, 'decode_ratio_ref')}" for _, r in group.iterrows()]
        fig.add_trace(go.Scatter(x=group["kv_cache_mb"], y=group["decode_ms_p50"], mode="markers",
                                 name=sweep.pool_title(pool), text=hover, hoverinfo="text", marker={"size": 10}))
    fig.update_layout(title="Decode per token against KV cache (decoder trials)", xaxis_title=label("kv_cache_mb"),
                      yaxis_title=label("decode_ms_p50"), height=420)
    return fig
