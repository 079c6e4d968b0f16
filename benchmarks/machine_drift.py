"""Machine drift: does this machine's speed change while nothing else runs, and does the
calibrated latency take it out?

    python benchmarks/machine_drift.py [--rounds 80] [--round-s 0.6] [--quick] [--out FILE]

One process, one thread (pin it: ``taskset -c 0``). The quickstart-sized ListOps encoder at
1 x 1024 tokens, untrained. For ``--rounds`` rounds of ``--round-s`` seconds each, every model
call is followed by one call of the reference workload (``omninet.trial.measure.calibration``:
four fp32 256x256 matmuls), one call of a tiny transformer forward (an alternative reference)
and, with ``--bf16`` (default), one call of the same model under bf16 autocast: does the fp32
reference follow a bf16 model's drift as well as an fp32 one's? Per round: the median model
latency, the median of each reference, and the median per-call ratio. Reported: the
coefficient of variation across rounds of the raw latency, of each reference and of each
ratio, and the correlation of the raw latency with each reference.

The drift is a change in the machine's speed over time. Rounds of a stable machine have a
raw CV near the within-round noise, and the ratio gains nothing. Rounds of a drifting host have
a raw CV well above it, strongly correlated with the reference, and the ratio's CV is small.
Measured on the 2-core KVM Xeon this was built on (80 rounds, quiet, benchmarks/results/
machine_drift.json): raw latency 11.6-19.3 ms, CV 18.9% across rounds (5.8% within a round);
the matmul reference 0.96-1.51 ms, correlation 0.99 with the latency; the ratio's CV 4.5% (to
the tiny transformer 4.9%). An earlier probe of the same kind gave 16.6% raw, 2.5% ratio. On a
2-core AMD EPYC KVM guest (avx512_bf16, no AMX; one run, load 1.9 at start, 1.4 at end) with the
bf16 call: raw CV 7.4% fp32 and 8.7% bf16 across rounds (5.9% within a round), ratios to the
matmul reference 4.0% and 5.0%; the bf16 latency's correlation with the reference 0.86.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omninet import ModelConfig, OmniNetModel  # noqa: E402
from omninet.trial.measure import CALIBRATION, calibration, load_average, machine_facts  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def _cv(xs: list[float]) -> float:
    return statistics.pstdev(xs) / statistics.fmean(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--round-s", type=float, default=0.6)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the same model under bf16 autocast, interleaved with the fp32 call")
    ap.add_argument("--quick", action="store_true", help="4 rounds of 0.1 s at 256 tokens: checks the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.round_s, args.seq = 4, 0.1, 256
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = OmniNetModel(ModelConfig(arch="encoder", vocab_size=32, num_classes=10, hidden_size=64, num_layers=2,
                                     num_heads=4, max_seq_length=args.seq)).eval()
    tiny = OmniNetModel(ModelConfig(arch="encoder", vocab_size=32, num_classes=10, hidden_size=64, num_layers=1,
                                    num_heads=4, max_seq_length=256)).eval()
    ids = torch.randint(1, 32, (1, args.seq))
    tiny_ids = torch.randint(1, 32, (1, 256))
    matmul = calibration()
    clock = time.perf_counter
    rounds = []
    load = {"start": load_average()}
    with torch.no_grad():
        for _ in range(3):
            model(ids)
            matmul()
            tiny(tiny_ids)
            if args.bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(ids)
        for _ in range(args.rounds):
            lat, mm, tt, r_mm, r_tt, lat16, r16 = [], [], [], [], [], [], []
            end = clock() + args.round_s
            while clock() < end or not lat:
                t0 = clock()
                model(ids)
                t1 = clock()
                matmul()
                t2 = clock()
                tiny(tiny_ids)
                t3 = clock()
                if args.bf16:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        model(ids)
                    lat16.append(clock() - t3)
                    r16.append(lat16[-1] / (t2 - t1))
                lat.append(t1 - t0)
                mm.append(t2 - t1)
                tt.append(t3 - t2)
                r_mm.append((t1 - t0) / (t2 - t1))
                r_tt.append((t1 - t0) / (t3 - t2))
            med = statistics.median
            rounds.append({"latency_ms": med(lat) * 1e3, "matmul_ref_ms": med(mm) * 1e3, "tiny_ref_ms": med(tt) * 1e3,
                           "ratio_to_matmul": med(r_mm), "ratio_to_tiny": med(r_tt),
                           "within_round_cv": _cv(lat), "calls": len(lat),
                           **({"latency_bf16_ms": med(lat16) * 1e3, "ratio_bf16_to_matmul": med(r16)}
                              if args.bf16 else {})})
    load["end"] = load_average()
    col = {k: [r[k] for r in rounds] for k in rounds[0]}

    def corr(a: str, b: str) -> float | None:
        try:
            return statistics.correlation(col[a], col[b])
        except statistics.StatisticsError:  # constant input (a quick run can have that)
            return None

    emit({
        "benchmark": "machine_drift", "quick": args.quick, "machine": machine_facts(), "load_avg": load,
        "setup": {"rounds": args.rounds, "round_s": args.round_s, "seq_length": args.seq, "threads": 1,
                  "reference": CALIBRATION, "alternative_reference": "1-layer encoder forward, 1 x 256 tokens",
                  "bf16": ("the same model under torch.autocast(cpu, bfloat16), right after the fp32 calls"
                           if args.bf16 else None)},
        "summary": {
            "cv_across_rounds": {"latency_raw": _cv(col["latency_ms"]), "matmul_ref": _cv(col["matmul_ref_ms"]),
                                 "tiny_ref": _cv(col["tiny_ref_ms"]), "ratio_to_matmul": _cv(col["ratio_to_matmul"]),
                                 "ratio_to_tiny": _cv(col["ratio_to_tiny"]),
                                 **({"latency_bf16_raw": _cv(col["latency_bf16_ms"]),
                                     "ratio_bf16_to_matmul": _cv(col["ratio_bf16_to_matmul"])} if args.bf16 else {})},
            "median_within_round_cv": statistics.median(col["within_round_cv"]),
            "correlation_with_latency": {"matmul_ref": corr("latency_ms", "matmul_ref_ms"),
                                         "tiny_ref": corr("latency_ms", "tiny_ref_ms"),
                                         **({"bf16_latency_with_matmul_ref": corr("latency_bf16_ms", "matmul_ref_ms"),
                                             "bf16_latency_with_fp32_latency": corr("latency_bf16_ms", "latency_ms")}
                                            if args.bf16 else {})},
            "latency_ms_min_max": [min(col["latency_ms"]), max(col["latency_ms"])],
            "matmul_ref_ms_min_max": [min(col["matmul_ref_ms"]), max(col["matmul_ref_ms"])],
        },
        "rounds": rounds,
    }, args.out)


if __name__ == "__main__":
    main()
