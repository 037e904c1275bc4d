"""Decode and prefill speed of 4-bit outputs in llmquant's CPU runtime against the float original.

    python eval/benchmarks/bench_speed.py [--threads 2] [--runs 5]

Quantizes SmolLM2-135M (the default model) with RTN w4 g64 (GPTQ and groupwise-int4 outputs have
the same layout, so the same speed) and NF4, then measures in one process, one model after the
other: the original in float32 and bfloat16, the w4 output on torch's packed int4 kernel
(bfloat16 activations), and NF4 (dequantized on the fly). Ratios are to the float32 and bfloat16
originals of the same run. Writes ``eval/benchmarks/results/speed_smollm2.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
if not __package__:  # run as a script (python eval/benchmarks/bench_speed.py): make `eval.benchmarks` importable
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default="/tmp/llmquant-bench-speed")
    parser.add_argument("--with-nf4", action="store_true", help="also time NF4, which is dequantized on the fly (slow)")
    args = parser.parse_args()
    import torch

    from eval.report import build_report, write_report
    from eval.run import SpeedSettings, evaluate_model
    from llmquant.api import quantize
    from llmquant.host.source import resolve_model

    torch.set_num_threads(args.threads)
    original = resolve_model(None)
    work = Path(args.work)
    outputs = {"rtn-w4-g64": {"algo": "rtn", "bits": 4, "group_size": 64, "dtype": "bfloat16"}}
    if args.with_nf4:
        outputs["nf4"] = {"algo": "nf4", "dtype": "bfloat16"}
    for name, settings in outputs.items():
        if not (work / name).exists():
            quantize(None, work / name, settings)
    speed = SpeedSettings(batch_sizes=(1, 8), prompt_tokens=128, new_tokens=32, runs=args.runs, warmup=2)
    plan = [("original fp32", original, torch.float32, "baseline"), ("original bf16", original, torch.bfloat16, "model"),
            ("rtn-w4-g64 int4 kernel", work / "rtn-w4-g64", torch.bfloat16, "model")]
    if args.with_nf4:
        plan.append(("nf4 dequant", work / "nf4", torch.bfloat16, "model"))
    rows = []
    for name, path, dtype, role in plan:
        row = evaluate_model(path, name=name, role=role, loader="llmquant", dtype=dtype, device="cpu", ppl=None, speed=speed).to_dict()
        rows.append(row)
        print(f"{row['name']:<26} decode b1 {row['speed'][0]['decode_tokens_per_s']:7.2f} tok/s  prefill b1 "
              f"{row['speed'][0]['prefill_tokens_per_s']:8.1f} tok/s  decode b8 {row['speed'][1]['decode_tokens_per_s']:7.2f}", flush=True)
    settings = {"dtype": "per row", "device": "cpu", "loader": "llmquant",
                "speed": f"batch 1 and 8, prompt 128 tokens, 32 new tokens, 2 warm-up + {args.runs} timed runs, {args.threads} threads"}
    report = build_report(rows, settings)
    bf16 = rows[1]
    for row in rows[2:]:
        for i, b in enumerate(speed.batch_sizes):
            report["comparison"][row["name"]][f"decode_ratio_vs_bf16_b{b}"] = row["speed"][i]["decode_tokens_per_s"] / bf16["speed"][i]["decode_tokens_per_s"]
    for path in write_report(report, RESULTS / "speed_smollm2.json"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
