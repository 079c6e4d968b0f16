"""One command for a lent accelerator machine (about 5 minutes on one GPU): does every CUDA path
of OmniNet run, agree with the eager reference, and keep block-sparse's speed?

    .venv/bin/python benchmarks/device_check.py [--out results.json]   # on a CUDA machine
    .venv/bin/python benchmarks/device_check.py --dry                  # CPU, tiny sizes (the suite's smoke)

Sections, each recorded with its own status (one failing section never hides the others):

- ``kernels``: every registered kernel against eager, forward and backward (q, k, v
  gradients), fp32, with no mask and with a padded batch, causal where the kernel runs causal
  attention; block-sparse without a mask runs compiled FlexAttention on CUDA (``flex`` rows
  say which path ran). Exact kernels must match within tolerance; Linformer (a low-rank
  approximation) is compared through its exact identity projections where it has them.
- ``speed``: block-sparse (87.5% and 50% sparsity, block 128) against dense SDPA, forward and
  forward+backward, B=1, H=8, D=64, at N = 4096 and 16384 (``--dry``: 256, 512), no mask and
  25% end padding on a second row; CUDA-event-free wall clock around a synchronize, median of
  ``--reps`` runs after warm-up, cells of one N timed round robin.
- ``autocast``: a small encoder's forward+backward under bf16 and fp16 autocast, per kernel:
  finite loss and gradients, and the logits' relative distance to fp32.
- ``trial``: ``omninet.trial.run_trial`` with a tiny ListOps config on the device.
- ``serve``: a model trained and saved like a trial's, loaded on the device, and one request
  through the server's ``Predictor`` (request parsing, bucketed batch, probabilities).

JSON out (stdout and ``--out``) with the device name and the machine (``machine_facts``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import omninet  # noqa: E402,F401  (registers every kernel)
from omninet.attention import KERNELS  # noqa: E402
from omninet.attention.block_sparse import BlockSparseLayout, block_sparse_attention  # noqa: E402
from omninet.attention.dense import sdpa_attention  # noqa: E402
from omninet.config import AttentionConfig, BlockSparseConfig, LinformerConfig, ModelConfig  # noqa: E402
from omninet.trial.measure import machine_facts  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

TOL = dict(rtol=2e-3, atol=2e-4)  # fp32 on a GPU: reductions in another order than eager's


def section(name: str, fn, device, args) -> dict:
    """Runs one section; a failure is recorded (with its traceback's last lines), not raised."""
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn(device, args)}
    except Exception as exc:  # noqa: BLE001 -- every section reports for itself
        out = {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}",
               "traceback": traceback.format_exc().splitlines()[-6:]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[device_check] {name}: {out['status']} ({out['seconds']} s)", file=sys.stderr, flush=True)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_config(kernel: str, *, arch: str = "encoder", n: int = 128) -> ModelConfig:
    """A tiny model whose sparse kernels run their sparse path at these sizes."""
    return ModelConfig(arch=arch, vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, max_seq_length=n,
                       dropout=0.0, num_classes=3 if arch == "encoder" else None, attention=AttentionConfig(
                           kernel=kernel, block_sparse=BlockSparseConfig(block_size=16, sparsity_factor=0.5,
                                                                         min_seq_length=0),
                           linformer=LinformerConfig(k=n, min_seq_length=0)))  # k = N: exact with identity E, F


def _reference_mask(state, mask, nq, nk, causal):
    layout = getattr(state, "sparse", state)  # hybrid's block-sparse layers run its BlockSparseLayout
    if hasattr(layout, "equivalent_mask") and not (hasattr(state, "uses_linformer") and state.uses_linformer(nk, causal)):
        return layout.equivalent_mask(mask, nq, nk, causal=causal)
    if state is not None and hasattr(state, "dense_mask"):
        dm = state.dense_mask(nq, nk).to(mask.device if mask is not None else "cpu")
        return dm if mask is None else mask & dm
    return mask


def kernels(device, args) -> dict:
    eager = KERNELS["eager"].fn
    n, rows = args.kernel_n, []
    for name, spec in sorted(KERNELS.items()):
        for causal in (False, True):
            if causal and not spec.supports_causal:
                continue
            cfg = small_config(name, arch="decoder" if causal else "encoder", n=n)
            state = spec.make_state(cfg, 0, False) if spec.make_state else None
            if state is not None:
                state = state.to(device)
                if not spec.exact and hasattr(state, "make_exact"):
                    state = state.make_exact(n)
            for masked in (False, True):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(2, 4, n, 16, generator=g).to(device).requires_grad_() for _ in range(3))
                mask = None
                if masked:
                    mask = (torch.arange(n)[None, :] < torch.tensor([[n], [n // 2 + 3]]))[:, None, None, :].to(device)
                row = {"kernel": name, "causal": causal, "mask": "padded" if masked else "none", "n": n}
                try:
                    out = spec.fn(q, k, v, mask=mask, causal=causal, scale=0.25, state=state)[0]
                    ref_mask = _reference_mask(state, mask, n, n, causal)
                    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    ref = eager(q2, k2, v2, mask=None if ref_mask is None else ref_mask.to(device), causal=causal,
                                scale=0.25)[0]
                    grad = torch.randn_like(out)
                    (out * grad).sum().backward()
                    (ref * grad).sum().backward()
                    errs = [(out - ref).abs().max().item()] + [(a.grad - b.grad).abs().max().item()
                                                                 for a, b in ((q, q2), (k, k2), (v, v2))]
                    exact = spec.exact or hasattr(state, "make_exact")
                    ok = all(math.isfinite(e) for e in errs) and (not exact or all(
                        torch.allclose(a, b, **TOL) for a, b in ((out, ref), (q.grad, q2.grad), (k.grad, k2.grad),
                                                                  (v.grad, v2.grad))))
                    flex = name in ("block_sparse", "hybrid") and device.type == "cuda" and mask is None
                    row.update({"max_abs_err_out": errs[0], "max_abs_err_grads": max(errs[1:]), "exact": exact,
                                "flex": flex, "ok": bool(ok)})
                except Exception as exc:  # noqa: BLE001 -- a kernel that fails is a finding, not a crash
                    row.update({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                rows.append(row)
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows)}


def _timed(runs: dict, device, *, reps: int, warmup: int) -> dict:
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def speed(device, args) -> dict:
    rows, ratios = [], {}
    B, H, D = 2, 8, 64
    for n in args.speed_sizes:
        states = {sp: BlockSparseLayout(BlockSparseConfig(block_size=args.speed_block, sparsity_factor=sp,
                                                          min_seq_length=0)).to(device) for sp in (0.875, 0.5)}
        pad = torch.ones(B, 1, 1, n, dtype=torch.bool, device=device)
        pad[1, ..., n - n // 4 :] = False
        for mode in ("fwd", "fwd_bwd"):
            q, k, v = (torch.randn(B, H, n, D, device=device, requires_grad=mode == "fwd_bwd") for _ in range(3))
            grad = torch.randn_like(q)

            def make(fn):
                if mode == "fwd":
                    def run():
                        with torch.no_grad():
                            fn()
                    return run

                def run():
                    for t in (q, k, v):
                        t.grad = None
                    fn().backward(grad)
                return run

            runs = {}
            for mask_name, mask in (("none", None), ("pad25", pad)):
                runs[("sdpa", mask_name)] = make(lambda m=mask: sdpa_attention(q, k, v, mask=m, scale=D ** -0.5)[0])
                for sp, st in states.items():
                    runs[(f"block_sparse_{sp:g}", mask_name)] = make(
                        lambda m=mask, s=st: block_sparse_attention(q, k, v, mask=m, scale=D ** -0.5, state=s)[0])
            timed = _timed(runs, device, reps=args.reps, warmup=args.warmup)
            for (kernel, mask_name), ms in timed.items():
                rows.append({"kernel": kernel, "n": n, "mode": mode, "mask": mask_name, "median_ms": ms})
                if kernel != "sdpa":
                    ratios[f"{kernel}/n={n}/{mode}/{mask_name}"] = round(ms / timed[("sdpa", mask_name)], 3)
    return {"shape": {"batch": B, "heads": H, "head_dim": D, "block": args.speed_block, "dtype": "float32"},
            "rows": rows, "time_vs_sdpa": ratios}


def autocast(device, args) -> dict:
    from omninet.model import OmniNetModel

    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for kernel in ("sdpa", "block_sparse", "eager", "hybrid"):
            torch.manual_seed(0)
            model = OmniNetModel(small_config(kernel, n=args.kernel_n)).to(device)
            ids = torch.randint(1, 97, (2, args.kernel_n), device=device)
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[1, args.kernel_n // 2 :] = False
            labels = torch.tensor([0, 2], device=device)
            row = {"dtype": str(dtype).removeprefix("torch."), "kernel": kernel}
            try:
                with torch.no_grad():
                    ref = model(ids, attention_mask=mask).logits.float()
                with torch.autocast(device.type, dtype=dtype):
                    out = model(ids, attention_mask=mask, labels=labels)
                out.loss.backward()
                grads_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                rel = ((out.logits.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                row.update({"loss": round(out.loss.item(), 5), "finite": bool(torch.isfinite(out.loss)) and grads_ok,
                            "logits_rel_err_vs_fp32": round(rel, 5), "ok": bool(grads_ok) and rel < 0.05})
            except Exception as exc:  # noqa: BLE001
                row.update({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            rows.append(row)
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows)}


def tiny_trial_config(device, dry: bool = False) -> dict:
    return {
        "task": {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 256, "num_eval": 64},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "train": {"steps": 8, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2},
        "hardware": {"device": device.type, "num_threads": 1},
        # --dry: one latency round of the minimum reps (the section proves a trial runs, not its speed)
        "measure": {"memory": False, **({"min_seconds": 0.0, "max_rounds": 1} if dry else {})},
    }


def trial(device, args) -> dict:
    from omninet.trial import run_trial

    res = run_trial(tiny_trial_config(device, dry=args.dry))
    out = {k: getattr(res, k, None) for k in ("status", "error", "device", "device_name", "accuracy", "steps",
                                              "latency_p50_ms", "train_seconds")}
    if out["status"] != "ok":
        raise RuntimeError(f"trial status {out['status']}: {out['error']}")
    return {"result": out}


def serve(device, args) -> dict:
    from omninet.artifacts import load_trial_model
    from omninet.serve.predictor import Predictor
    from omninet.serve.testing import quick_trained_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_trial_config(torch.device("cpu"))
        folder = quick_trained_model(cfg, Path(tmp) / "model")
        predictor = Predictor(load_trial_model(folder, device=device))
        inputs = predictor.parse('{"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8]]}')
        t0 = time.perf_counter()
        results = predictor.run_batch(inputs.sequences)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        if any(isinstance(r, Exception) for r in results):
            raise RuntimeError(f"request failed: {results}")
        return {"predictions": [r["prediction"] for r in results], "request_ms": round(ms, 2),
                "model_device": str(predictor.trained.device)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes: everything that can run without a GPU")
    p.add_argument("--kernel-n", type=int, default=256)
    p.add_argument("--speed-sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--speed-block", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["kernels", "speed", "autocast", "trial", "serve"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry:
        args.kernel_n, args.speed_sizes, args.speed_block, args.reps, args.warmup = 64, [256], 16, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("device_check needs a CUDA device; use --dry for the CPU dry run")
    device = torch.device("cpu" if args.dry else "cuda")
    t0 = time.perf_counter()
    sections = {"kernels": kernels, "speed": speed, "autocast": autocast, "trial": trial, "serve": serve}
    results = {name: section(name, sections[name], device, args) for name in args.sections}
    doc = {
        "benchmark": "device_check", "dry": args.dry, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine_facts()["cpu_model"],
        "cuda": torch.version.cuda, "machine": machine_facts(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **results, "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    emit(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
