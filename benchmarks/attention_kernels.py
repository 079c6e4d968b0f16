"""Attention kernels side by side: latency and measured peak memory.

    .venv/bin/python benchmarks/attention_kernels.py [--quick] [--out results.json]

Kernels: naive "standard attention" (materialized scores, the model card's baseline),
dense SDPA, compiled FlexAttention on the 12.5% block-sparse mask (forward only: CPU
FlexAttention has no backward; compile time reported separately), our block-sparse kernel
at densities 50% / 25% / 12.5%, Linformer at k = 128 / 256. Shapes: fp32, B=1, H=16, D=64,
block 128, N = 1024 .. 8192; forward (no grad) and forward+backward (grads of q, k, v and of
Linformer's projections). Times: median (and min) of ``--reps`` timed runs after ``--warmup``
runs, taken round robin over the kernels of one (N, mode) so that load from other processes
drifts over all of them alike; wall clock and this process's CPU time.

Peak memory: ``omninet.trial.measure.peak_memory_mb`` (the profiler's memory timeline: the most
tensor bytes the call held at once beyond what existed before it; inputs excluded; outputs,
saved activations and gradients included; Python heap and allocator slack not counted).
Measured twice: ``peak_mb`` on a later call (after the timed runs) in this process, and
``peak_mb_first_call`` on the very first call of the kernel in a fresh subprocess (nothing
warmed up or cached; ``--no-first-call`` skips it). A kernel that keeps buffers between
calls shows up as a difference between the two.

The block-sparse state is built with ``min_seq_length=0`` so that the sparse path is
measured at every N (the model switches to dense SDPA at <= 1024 tokens by default).
Output: one JSON document (stdout, and ``--out``) with every row, the ratios against SDPA and
naive attention, and the issue's targets evaluated at N=4096.

Padding suite (issue 25; ``--suite padding`` runs only it): the block-sparse kernel with a
[B, N] key-padding mask as the trial runner and the server pass it, at the issue's shape (fp32,
B=2, H=4, D=16), N = 1024 and 4096, block 16-128, sparsity 0.5-0.9: no mask, an all-True mask
and 25% end padding on half the rows (row 1 of 2), against SDPA with the same mask; and
forward+backward at N = 256 and 1024, block 16 and 64, sparsity 0.5 and 0.85, against SDPA
(no mask and the padded batch). Each case's cells are timed round robin in one run
(``--padding-reps`` medians, wall clock and this process's CPU time), so every ratio is
measured side by side. Each block-sparse cell also reports ``in_kernel_fraction``: the share of
a call spent inside the flash kernel's own calls (the only part more threads can split), which
is what the two-thread ratios are read against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omninet.attention.block_sparse import BlockSparseLayout, block_sparse_attention  # noqa: E402
from omninet.trial.measure import machine_facts, peak_memory_mb  # noqa: E402
from omninet.attention.linformer import LinformerProjection, linformer_core  # noqa: E402
from omninet.config import BlockSparseConfig, LinformerConfig  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

DENSITIES = (0.5, 0.25, 0.125)
RANKS = (128, 256)


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that matter for these kernels (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def median_ms(fn, *, reps: int, warmup: int, cpu: list | None = None) -> tuple[float, list[float]]:
    """Median wall-clock ms; ``cpu`` (if given) receives this process's CPU ms per run, which
    is less sensitive than wall time to other processes competing for the cores."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
        if cpu is not None:
            cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(runs), runs


def naive_attention(q, k, v, scale):
    """The model card's baseline: materialized (N x N) scores and weights."""
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, N, N)
    return torch.matmul(weights, v)


def make_kernels(args, n: int):
    """name -> (variant, forward fn(q, k, v) -> out, params needing grads, supports backward)."""
    scale = 1.0 / math.sqrt(args.head_dim)
    out = {
        "naive": ("dense", lambda q, k, v: naive_attention(q, k, v, scale), [], True),
        "sdpa": ("dense", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), [], True),
        "sdpa_causal": ("dense causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                                       is_causal=True), [], True),
    }
    for d in DENSITIES:
        state = BlockSparseLayout(BlockSparseConfig(block_size=args.block_size, sparsity_factor=1.0 - d,
                                                    min_seq_length=0, backend="gather"))
        out[f"block_sparse_{d:g}"] = (f"density={d:g}", lambda q, k, v, s=state: block_sparse_attention(
            q, k, v, scale=scale, state=s)[0], [], True)
    causal = BlockSparseLayout(BlockSparseConfig(block_size=args.block_size, sparsity_factor=0.875, min_seq_length=0,
                                                 backend="gather"), causal=True)
    out["block_sparse_causal_0.125"] = ("density=0.125 causal", lambda q, k, v: block_sparse_attention(
        q, k, v, scale=scale, causal=True, state=causal)[0], [], True)
    for r in RANKS:
        proj = LinformerProjection(LinformerConfig(k=r, min_seq_length=0), max_seq_length=n)
        out[f"linformer_{r}"] = (f"k={r}", lambda q, k, v, p=proj: linformer_core(
            q, k, v, mask=None, scale=scale, dropout_p=0.0, need_weights=False, state=p)[0], list(proj.parameters()), True)
    return out


def flex_kernel(args, n: int):
    """Compiled FlexAttention on the 12.5% layout; returns (fn, compile seconds) or (None, reason)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        state = BlockSparseLayout(BlockSparseConfig(block_size=args.block_size, sparsity_factor=0.875, min_seq_length=0))
        block_mask = state.block_mask(n, n, False, "cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        scale = 1.0 / math.sqrt(args.head_dim)
        fn = lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale)  # noqa: E731
        q = torch.randn(1, args.heads, n, args.head_dim)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(q, q, q)
        return fn, time.perf_counter() - t0
    except Exception as exc:  # a missing C++ toolchain or an unsupported build: report, do not fail
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def make_run(fn, params, q, k, v, mode: str):
    """The measured call: forward under no_grad, or forward + backward."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
    else:
        leaves = [q, k, v, *params]
        grad_out = torch.randn_like(q)

        def run():
            for t in leaves:
                t.grad = None
            fn(q, k, v).backward(grad_out)
    return run


def bench_mode(cases: dict, mode: str, args) -> dict:
    """name -> timing and memory row for every case (fn, params, q, k, v). Timed runs go round
    robin over the cases, so drifting load from other processes hits every kernel alike."""
    runs = {name: make_run(fn, params, q, k, v, mode) for name, (fn, params, q, k, v) in cases.items()}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    for _ in range(args.reps):
        for name, run in runs.items():
            wall[name] += median_ms(run, reps=1, warmup=0, cpu=cpu[name])[1]
    out = {}
    for name, run in runs.items():
        out[name] = {"median_ms": round(statistics.median(wall[name]), 3), "min_ms": round(min(wall[name]), 3),
                     "runs_ms": [round(r, 3) for r in wall[name]],
                     "median_cpu_ms": round(statistics.median(cpu[name]), 3), "peak_mb": round(peak_memory_mb(run), 2)}
    return out


def first_call_peak(name: str, n: int, mode: str, args) -> float | None:
    """Peak MB of the kernel's very first call, measured in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--first-call-child", name, str(n), mode, "--batch", str(args.batch),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--block-size", str(args.block_size)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as exc:
        print(f"first-call measurement failed for {name} n={n} {mode}: {exc}", file=sys.stderr)
        return None


def first_call_child(args) -> None:
    name, n, mode = args.first_call_child[0], int(args.first_call_child[1]), args.first_call_child[2]
    torch.manual_seed(0)
    _, fn, params, _ = make_kernels(args, n)[name]
    q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, requires_grad=mode == "fwd_bwd") for _ in range(3))
    print(json.dumps({"peak_mb": round(peak_memory_mb(make_run(fn, params, q, k, v, mode)), 2)}))


def run_benchmark(args) -> dict:
    torch.manual_seed(0)
    rows, compile_s = [], {}
    for n in args.sizes:
        kernels = make_kernels(args, n)
        if args.flex and n in args.flex_sizes:
            fn, info = flex_kernel(args, n)
            if fn is None:
                rows.append({"kernel": "flex_compiled_0.125", "n": n, "mode": "fwd", "status": f"skipped: {info}"})
            else:
                compile_s[n] = round(info, 2)
                kernels["flex_compiled_0.125"] = ("density=0.125", fn, [], False)
        for mode in ("fwd", "fwd_bwd"):
            cases, heads = {}, {}
            for name, (variant, fn, params, has_bwd) in kernels.items():
                if args.kernels and name not in args.kernels:
                    continue
                row = {"kernel": name, "variant": variant, "n": n, "mode": mode}
                if mode == "fwd_bwd" and not has_bwd:
                    rows.append({**row, "status": "skipped: no backward on CPU"})
                    continue
                if name == "naive" and n > args.naive_max_n:
                    rows.append({**row, "status": f"skipped: N > --naive-max-n={args.naive_max_n} (memory)"})
                    continue
                shape = (args.batch, args.heads, n, args.head_dim)
                cases[name] = (fn, params, *(torch.randn(shape, requires_grad=mode == "fwd_bwd") for _ in range(3)))
                heads[name] = row
            for name, result in bench_mode(cases, mode, args).items():
                row = {**heads[name], **result, "status": "ok"}
                if args.first_call and n == args.target_n and name in args.first_call_kernels:
                    row["peak_mb_first_call"] = first_call_peak(name, n, mode, args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows, "flex_compile_seconds": compile_s}


def summarize(rows: list[dict], target_n: int) -> tuple[dict, dict]:
    ok = {(r["kernel"], r["n"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    ratios = {}
    for (name, n, mode), r in ok.items():
        sdpa, naive = ok.get(("sdpa", n, mode)), ok.get(("naive", n, mode))
        ratios[f"{name}/n={n}/{mode}"] = {
            "speedup_vs_sdpa": round(sdpa["median_ms"] / r["median_ms"], 3) if sdpa else None,
            "speedup_vs_sdpa_min": round(sdpa["min_ms"] / r["min_ms"], 3) if sdpa else None,
            "speedup_vs_naive": round(naive["median_ms"] / r["median_ms"], 3) if naive else None,
            "cpu_time_speedup_vs_sdpa": round(sdpa["median_cpu_ms"] / r["median_cpu_ms"], 3) if sdpa else None,
            "memory_vs_naive": round(r["peak_mb"] / naive["peak_mb"], 4) if naive and naive["peak_mb"] else None,
        }

    def get(name, n, mode, key):
        return ok.get((name, n, mode), {}).get(key)

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    n = target_n
    bs_fwd, bs_fb = get("block_sparse_0.125", n, "fwd", "median_ms"), get("block_sparse_0.125", n, "fwd_bwd", "median_ms")
    lin_small, lin_large = get("linformer_256", n // 2, "fwd", "peak_mb"), get("linformer_256", 2 * n, "fwd", "peak_mb")
    def mem_ratio(name, mode, key):
        return ratio(get(name, n, mode, key), get("sdpa", n, mode, key))

    def mem_excess(name, mode, key):
        a, b = get(name, n, mode, key), get("sdpa", n, mode, key)
        return None if a is None or b is None else round(a - b, 2)

    targets = {
        "block_sparse_0.125_fwd_peak_minus_sdpa_mb": (mem_excess("block_sparse_0.125", "fwd", "peak_mb"), "<=", 8.0),
        "block_sparse_0.125_fwd_peak_minus_sdpa_mb_first_call": (
            mem_excess("block_sparse_0.125", "fwd", "peak_mb_first_call"), "<=", 8.0),
        "block_sparse_0.125_fwd_bwd_peak_vs_sdpa": (mem_ratio("block_sparse_0.125", "fwd_bwd", "peak_mb"), "<=", 1.5),
        "block_sparse_0.125_fwd_bwd_peak_vs_sdpa_first_call": (
            mem_ratio("block_sparse_0.125", "fwd_bwd", "peak_mb_first_call"), "<=", 1.5),
        "block_sparse_0.5_fwd_bwd_speedup_vs_sdpa": (
            ratio(get("sdpa", n, "fwd_bwd", "median_ms"), get("block_sparse_0.5", n, "fwd_bwd", "median_ms")), ">=", 1.0),
        "block_sparse_0.5_fwd_bwd_cpu_time_speedup_vs_sdpa": (
            ratio(get("sdpa", n, "fwd_bwd", "median_cpu_ms"), get("block_sparse_0.5", n, "fwd_bwd", "median_cpu_ms")),
            ">=", 1.0),
        "block_sparse_0.125_fwd_cpu_time_speedup_vs_sdpa": (
            ratio(get("sdpa", n, "fwd", "median_cpu_ms"), get("block_sparse_0.125", n, "fwd", "median_cpu_ms")), ">=", 3.0),
        "block_sparse_0.125_fwd_bwd_cpu_time_speedup_vs_sdpa": (
            ratio(get("sdpa", n, "fwd_bwd", "median_cpu_ms"), get("block_sparse_0.125", n, "fwd_bwd", "median_cpu_ms")),
            ">=", 2.5),
        "block_sparse_causal_0.125_fwd_bwd_speedup_vs_sdpa_causal": (
            ratio(get("sdpa_causal", n, "fwd_bwd", "median_ms"), get("block_sparse_causal_0.125", n, "fwd_bwd", "median_ms")),
            ">=", 1.0),
        "block_sparse_0.125_fwd_speedup_vs_sdpa": (ratio(get("sdpa", n, "fwd", "median_ms"), bs_fwd), ">=", 3.0),
        "block_sparse_0.125_fwd_bwd_speedup_vs_sdpa": (ratio(get("sdpa", n, "fwd_bwd", "median_ms"), bs_fb), ">=", 2.5),
        "block_sparse_0.125_fwd_speedup_vs_flex_compiled": (
            ratio(get("flex_compiled_0.125", n, "fwd", "median_ms"), bs_fwd), ">=", 1.0),
        "block_sparse_0.125_fwd_memory_vs_naive": (
            ratio(get("block_sparse_0.125", n, "fwd", "peak_mb"), get("naive", n, "fwd", "peak_mb")), "<=", 0.2),
        "block_sparse_0.125_fwd_bwd_memory_vs_naive": (
            ratio(get("block_sparse_0.125", n, "fwd_bwd", "peak_mb"), get("naive", n, "fwd_bwd", "peak_mb")), "<=", 0.2),
        "linformer_256_fwd_speedup_vs_sdpa": (
            ratio(get("sdpa", n, "fwd", "median_ms"), get("linformer_256", n, "fwd", "median_ms")), ">=", 5.0),
        f"linformer_256_fwd_memory_growth_n{n // 2}_to_n{2 * n}": (ratio(lin_large, lin_small), "<=", 4.5),
    }
    out = {}
    for key, (value, op, bound) in targets.items():
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"value": value, "target": f"{op} {bound}", "met": met, "at_n": n}
    return ratios, out


# ---- padding suite (issue 25) ---------------------------------------------------------------
PAD_MASKS = ("none", "all_true", "pad25_half")


def padding_mask(kind: str, B: int, n: int):
    """None, an all-True (B, 1, 1, N) mask, or 25% end padding on half the rows (the odd ones)."""
    if kind == "none":
        return None
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    if kind == "pad25_half":
        mask[1::2, ..., n - n // 4 :] = False
    return mask


def interleaved_ms(runs: dict, *, reps: int, warmup: int) -> dict:
    """name -> {median_ms, median_cpu_ms, iqr_ms, runs_ms, runs_cpu_ms}: every run once per round,
    ``reps`` rounds after warm-up. CPU time is this process's (``time.process_time``: all its
    threads), so with one pinned thread it leaves out the time other processes held the core."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)

    def iqr(t):
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0], t[0], t[0]]
        return [round(q[0], 3), round(q[2], 3)]

    return {name: {"median_ms": round(statistics.median(t), 3), "median_cpu_ms": round(statistics.median(cpu[name]), 3),
                   "iqr_ms": iqr(t), "runs_ms": [round(x, 3) for x in t], "runs_cpu_ms": [round(x, 3) for x in cpu[name]]}
            for name, t in times.items()}


def _attention_call(kind: str, q, k, v, mask, state, scale):
    if kind == "sdpa":  # the kernel the model runs for dense attention, with the same mask
        from omninet.attention.dense import sdpa_attention
        return sdpa_attention(q, k, v, mask=mask, scale=scale)[0]
    return block_sparse_attention(q, k, v, mask=mask, scale=scale, state=state)[0]


def _padding_run(kind, mask, state, shape, mode, scale):
    q, k, v = (torch.randn(shape, requires_grad=mode == "fwd_bwd") for _ in range(3))
    if mode == "fwd":
        def run():
            with torch.no_grad():
                _attention_call(kind, q, k, v, mask, state, scale)
        return run
    grad = torch.randn(shape)

    def run():
        for t in (q, k, v):
            t.grad = None
        _attention_call(kind, q, k, v, mask, state, scale).backward(grad)
    return run


def in_kernel_ms(run, reps: int = 5) -> tuple[float, float]:
    """(median wall ms of a call, median ms of it spent inside the CPU flash kernel's own calls),
    the kernel entry points timed by wrapping them for these calls only: the rest is the
    block-sparse path's Python, views, merges and gradient sums, which no thread count splits."""
    import omninet.attention.block_sparse.executor as bsa  # where the slab executor calls the flash kernel

    inside = [0.0]

    def timed(op):
        def call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return op(*a, **kw)
            finally:
                inside[0] += time.perf_counter() - t0
        return call

    fwd, bwd = bsa._FLASH, bsa._FLASH_BWD
    bsa._FLASH, bsa._FLASH_BWD = timed(fwd), timed(bwd)
    walls, kernels = [], []
    try:
        for _ in range(reps):
            inside[0] = 0.0
            t0 = time.perf_counter()
            run()
            walls.append((time.perf_counter() - t0) * 1e3)
            kernels.append(inside[0] * 1e3)
    finally:
        bsa._FLASH, bsa._FLASH_BWD = fwd, bwd
    return round(statistics.median(walls), 3), round(statistics.median(kernels), 3)


def padding_suite(args) -> dict:
    """Rows of the padding suite and its targets (see the module docstring)."""
    B, H, D = args.padding_batch, args.padding_heads, args.padding_head_dim
    scale = D ** -0.5
    rows = []

    def case(n, block, sparsity, mode, masks, kinds=("block_sparse", "sdpa")):
        state = BlockSparseLayout(BlockSparseConfig(block_size=block, sparsity_factor=sparsity, min_seq_length=0,
                                                    backend="gather"))
        runs = {(kind, m): _padding_run(kind, padding_mask(m, B, n), state, (B, H, n, D), mode, scale)
                for kind in kinds for m in masks}
        timed = interleaved_ms(runs, reps=args.padding_reps, warmup=args.warmup)
        for (kind, m), t in timed.items():
            extra = {}
            if kind == "block_sparse":  # how much of a call the flash kernel itself takes (threads split only that)
                wall, inside = in_kernel_ms(runs[(kind, m)])
                extra = {"in_kernel_ms": inside, "in_kernel_fraction": round(inside / wall, 3) if wall else None}
            rows.append({"kernel": kind, "n": n, "block": block, "sparsity": sparsity, "mode": mode, "mask": m, **t,
                         **extra})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("runs")}), file=sys.stderr,
                  flush=True)

    for n in args.padding_sizes:
        for block in args.padding_blocks:
            for sparsity in args.padding_sparsities:
                case(n, block, sparsity, "fwd", PAD_MASKS)
    for n in args.padding_fb_sizes:
        for block in args.padding_fb_blocks:
            for sparsity in args.padding_fb_sparsities:
                case(n, block, sparsity, "fwd_bwd", ("none", "pad25_half"))
    return {"rows": rows, "shape": {"batch": B, "heads": H, "head_dim": D, "dtype": "float32"},
            **padding_targets(rows)}


def padding_targets(rows: list[dict]) -> dict:
    """Ratios from cells of one case (same N, block, sparsity, mode), and the issue's targets."""
    by = {(r["kernel"], r["n"], r["block"], r["sparsity"], r["mode"], r["mask"]): r["median_ms"] for r in rows}
    cpu = {(r["kernel"], r["n"], r["block"], r["sparsity"], r["mode"], r["mask"]): r["median_cpu_ms"] for r in rows}
    one_thread = torch.get_num_threads() == 1
    ratios = []
    for (kind, n, block, sp, mode, m), ms in by.items():
        if kind != "block_sparse":
            continue
        c = cpu[(kind, n, block, sp, mode, m)]
        row = {"n": n, "block": block, "sparsity": sp, "mode": mode, "mask": m,
               "vs_sdpa_same_mask": round(ms / by[("sdpa", n, block, sp, mode, m)], 3)}
        if m != "none":
            row["vs_own_no_mask"] = round(ms / by[(kind, n, block, sp, mode, "none")], 3)
        if one_thread:  # with more threads, OpenMP's spinning workers count as CPU time: no CPU ratios
            row["vs_sdpa_same_mask_cpu"] = round(c / cpu[("sdpa", n, block, sp, mode, m)], 3)
            if m != "none":
                row["vs_own_no_mask_cpu"] = round(c / cpu[(kind, n, block, sp, mode, "none")], 3)
        ratios.append(row)
    fwd = [r for r in ratios if r["mode"] == "fwd"]
    fb = [r for r in ratios if r["mode"] == "fwd_bwd"]

    def worst(rs, key):
        values = [r[key] for r in rs if key in r]
        return max(values) if values else None

    def target(rs, key, op, bound):
        """Judged on wall-clock medians; the CPU-time ratio (other processes' time left out) beside it."""
        value, value_cpu = worst(rs, key), worst(rs, key + "_cpu")
        met = None if value is None else (value <= bound if op == "<=" else value < bound)
        return {"value": value, "value_cpu": value_cpu, "target": f"{op} {bound}", "met": met}

    targets = {
        "masked_vs_own_no_mask_worst": target(fwd, "vs_own_no_mask", "<=", 1.10),
        "masked_vs_sdpa_same_mask_worst_at_sparsity_ge_0.75": target(
            [r for r in fwd if r["sparsity"] >= 0.75 and r["mask"] != "none"], "vs_sdpa_same_mask", "<=", 0.8),
        "fwd_bwd_vs_sdpa_worst_at_sparsity_0.5": target(
            [r for r in fb if r["sparsity"] <= 0.5], "vs_sdpa_same_mask", "<=", 1.2),
        "fwd_bwd_vs_sdpa_worst_at_sparsity_0.85": target(
            [r for r in fb if r["sparsity"] >= 0.85], "vs_sdpa_same_mask", "<", 1.0),
        "fwd_bwd_vs_sdpa_worst_at_n1024_sparsity_0.5": target(
            [r for r in fb if r["sparsity"] <= 0.5 and r["n"] >= 1024], "vs_sdpa_same_mask", "<=", 1.2),
        "fwd_bwd_vs_sdpa_worst_at_n1024_sparsity_0.85": target(
            [r for r in fb if r["sparsity"] >= 0.85 and r["n"] >= 1024], "vs_sdpa_same_mask", "<", 1.0),
    }
    return {"ratios": ratios, "targets": targets}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 3 runs, no FlexAttention compile")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--naive-max-n", type=int, default=4096, help="skip naive attention above this N (O(N^2) memory)")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip compiled FlexAttention")
    p.add_argument("--flex-sizes", type=int, nargs="+", default=[4096],
                   help="N at which to compile FlexAttention (each compile takes minutes on a loaded 2-core CPU)")
    p.add_argument("--target-n", type=int, default=4096)
    p.add_argument("--kernels", nargs="+", default=None, help="only these rows, e.g. sdpa linformer_256")
    p.add_argument("--no-first-call", dest="first_call", action="store_false",
                   help="skip the first-call memory figure (one fresh subprocess per row)")
    p.add_argument("--first-call-kernels", nargs="+", default=None,
                   help="rows (at --target-n) that get a first-call figure; default: all but compiled FlexAttention")
    p.add_argument("--first-call-child", nargs=3, metavar=("KERNEL", "N", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core); 1 with `taskset -c 0` measures one "
                        "core while other work runs on the other")
    p.add_argument("--suite", choices=("all", "kernels", "padding"), default="all",
                   help="kernels: the kernel table; padding: the padding suite (issue 25); all: both")
    p.add_argument("--padding-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--padding-blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--padding-sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--padding-fb-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--padding-fb-blocks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--padding-fb-sparsities", type=float, nargs="+", default=[0.5, 0.85])
    p.add_argument("--padding-batch", type=int, default=2)
    p.add_argument("--padding-heads", type=int, default=4)
    p.add_argument("--padding-head-dim", type=int, default=16)
    p.add_argument("--padding-reps", type=int, default=21)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_call_kernels is None:
        args.first_call_kernels = [k for k in ("naive", "sdpa", "sdpa_causal", *(f"block_sparse_{d:g}" for d in DENSITIES),
                                               "block_sparse_causal_0.125", *(f"linformer_{r}" for r in RANKS))]
    if args.quick:
        args.sizes, args.heads, args.head_dim, args.block_size = [64, 128, 256], 2, 16, 16
        args.reps, args.warmup, args.flex, args.target_n = 3, 1, False, 128
        # one fresh interpreter per (kernel, mode) costs ~6 s each: the smoke proves the path on
        # our own kernel only (fwd and fwd_bwd)
        args.first_call_kernels = ["block_sparse_0.125"]
        args.padding_sizes, args.padding_blocks, args.padding_sparsities = [128], [16], [0.5, 0.9]
        args.padding_fb_sizes, args.padding_fb_blocks, args.padding_fb_sparsities = [64], [16], [0.5, 0.85]
        args.padding_reps = 3
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.first_call_child:
        return first_call_child(args)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    result = run_benchmark(args) if args.suite != "padding" else {"rows": [], "flex_compile_seconds": {}}
    ratios, targets = summarize(result["rows"], args.target_n)
    padding = padding_suite(args) if args.suite != "kernels" else None
    doc = {
        "benchmark": "attention_kernels",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "timing": "wall-clock median (median_ms) and this process's CPU time (median_cpu_ms); other processes "
                      "share the cores: see load_avg",
            "python": platform.python_version(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        },
        "rows": result["rows"],
        "flex_compile_seconds": result["flex_compile_seconds"],
        "ratios": ratios,
        "targets": targets,
        "padding": padding,
        "machine": machine_facts(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    emit(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
