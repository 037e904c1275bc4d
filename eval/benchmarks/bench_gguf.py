"""llmquant's GGUF against llama.cpp's own quantizer, every row scored by llama.cpp itself.

    python eval/benchmarks/bench_gguf.py --model smollm2|gemma3|qwen2.5-coder-1.5b [--rows ROW,...] [--seed N]
                                         [--llama-cpp-python PATH] [--redo] [--docs]

(or ``python -m eval.benchmarks.bench_gguf ...``). llama.cpp's rows quantize llmquant's F16 GGUF of
the model with ``llama_model_quantize`` (what ``llama-quantize`` runs): Q4_0 and Q4_K_M, each with
llama.cpp's default mix (the head at Q6_K/Q8_0, Q4_K_M's Q6_K layers) and ``pure`` (every tensor at
the named type). llmquant's rows write RTN, groupwise-int4 and GPTQ codes straight into Q4_0 and
Q4_K blocks (groups of 32), GPTQ calibrated on 64 x 512 tokens of Wikipedia extracts as in the peers
benchmark, and the ``configs/gguf-q4_k_m.toml`` recipe. Perplexity: WikiText-2 test, the model's
windows of 2048 tokens, computed from llama.cpp's logits (``llmquant/llama_cpp_probe.py`` in the
llama-cpp-python environment, default ``$LLMQUANT_LLAMA_CPP_PYTHON``); file size and bits per weight
beside each. Results go to ``eval/benchmarks/results/gguf_<model>.json`` (kept by row unless
``--redo``; ``--seed N`` runs the calibrated rows on other calibration windows, kept under
``seed_runs``) and the table to ``docs/benchmarks.md`` between its gguf markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
if not __package__:
    sys.path.insert(0, str(ROOT))

from eval.benchmarks.peers_rows import CALIB_SAMPLES, CALIB_SEQLEN  # noqa: E402

PROBE = ROOT / "llmquant" / "llama_cpp_probe.py"
START, END = "<!-- gguf:start (eval/benchmarks/bench_gguf.py writes this section) -->", "<!-- gguf:end -->"
FTYPES = {"q4_0": 2, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*

# row -> ("llama.cpp", {ftype, pure}) or ("llmquant", settings)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "f16": ("llmquant", {"ignore": [".*"], "gguf_type": "f16", "gguf_embedding_type": "f16"}),
    "llama.cpp-q4_0": ("llama.cpp", {"ftype": "q4_0", "pure": False}),
    "llama.cpp-q4_0-pure": ("llama.cpp", {"ftype": "q4_0", "pure": True}),
    "llama.cpp-q4_k_m": ("llama.cpp", {"ftype": "q4_k_m", "pure": False}),
    "llama.cpp-q4_k_m-pure": ("llama.cpp", {"ftype": "q4_k_m", "pure": True}),
    "rtn-q4_0": ("llmquant", {"algo": "rtn", "gguf_type": "q4_0"}),
    "groupwise-q4_0": ("llmquant", {"algo": "groupwise-int4", "gguf_type": "q4_0"}),
    "gptq-q4_0": ("llmquant", {"algo": "gptq", "gguf_type": "q4_0"}),
    "rtn-q4_k": ("llmquant", {"algo": "rtn", "gguf_type": "q4_k"}),
    "groupwise-q4_k": ("llmquant", {"algo": "groupwise-int4", "gguf_type": "q4_k"}),
    "gptq-q4_k": ("llmquant", {"algo": "gptq", "gguf_type": "q4_k"}),
    "gptq-q4_k_m-recipe": ("llmquant", {"algo": "gptq", "config": "configs/gguf-q4_k_m.toml"}),
}


def calibrated(row: str) -> bool:
    return ROWS[row][0] == "llmquant" and ROWS[row][1].get("algo") == "gptq"


def quantize_row(row: str, out: Path, model: Path, f16: Path, python: str, seed: int, resume: bool = False) -> float:
    """Write the row's model.gguf under `out` (`resume`: continue an interrupted llmquant run there); return the
    seconds it took."""
    from eval.benchmarks.real_models import wiki_extracts

    tool, settings = ROWS[row]
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if tool == "llama.cpp":
        out.mkdir(parents=True)
        command = [python, str(PROBE), "--quantize", str(f16 / "model.gguf"), str(out / "model.gguf"),
                   str(FTYPES[settings["ftype"]]), *(["--pure"] if settings["pure"] else [])]
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start
    args = [sys.executable, "-m", "llmquant.cli", "quantize", str(model), "-o", str(out), "--format", "gguf"]
    if "config" in settings:
        args += ["--config", str(ROOT / settings["config"]), "--algo", settings["algo"]]
    else:
        args += ["--algo", settings.get("algo", "rtn"), "--gguf-type", settings["gguf_type"], "--group-size", "32"]
        args += [f"--ignore={p}" for p in settings.get("ignore", [])]
        args += ["--gguf-embedding-type", settings["gguf_embedding_type"]] if "gguf_embedding_type" in settings else []
    args += ["--resume"] if resume else []
    if calibrated(row):
        args += ["--calib", wiki_extracts(), "--calib-samples", str(CALIB_SAMPLES), "--calib-seqlen", str(CALIB_SEQLEN),
                 "--seed", str(seed)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{row}: llmquant failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def score(gguf_file: Path, windows: list[list[int]], python: str) -> dict[str, float]:
    """Perplexity from llama.cpp's logits over `windows`."""
    from llmquant.verify import run_probe

    data = run_probe("llama_cpp_probe.py", gguf_file, {"windows": windows}, python, 7200, "llama.cpp")
    if "error" in data:
        raise RuntimeError(f"llama.cpp could not score {gguf_file}: {data['error']}")
    import math

    return {"perplexity": math.exp(data["nll"] / data["tokens"]), "tokens": data["tokens"]}


def run_model(name: str, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from eval.benchmarks.real_models import MODELS, model_folder, wikitext_path
    from eval.perplexity import windows as cut_windows

    spec = MODELS[name]
    model = model_folder(name)
    path = RESULTS / f"gguf_{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    table = results["rows"] if args.seed == 0 else results.setdefault("seed_runs", {}).setdefault(str(args.seed), {})
    ids = AutoTokenizer.from_pretrained(model)(wikitext_path().read_text(), return_tensors="pt").input_ids[0]
    windows = cut_windows(ids, 2048, args.windows or spec.ppl_windows).tolist()
    params = sum(_numel(model))
    results["settings"] = {"model": spec.description, "params": params, "perplexity":
                           f"WikiText-2 test, first {len(windows)} windows of 2048 tokens, from llama.cpp's logits",
                           "calibration": f"GPTQ: {CALIB_SAMPLES} x {CALIB_SEQLEN} tokens of Wikipedia extracts, seed 0",
                           "groups": "llmquant rows: groups of 32 (Q4_K: 8 per super-block of 256)"}
    work = Path(args.work) / name
    f16 = work / "f16"
    if not (f16 / "model.gguf").exists():
        quantize_row("f16", f16, model, f16, args.llama_cpp_python, 0)
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    for row in rows:
        if args.seed and not calibrated(row):
            continue
        if row in table and "perplexity" in table[row] and not args.redo:
            print(f"{name} {row}: kept {table[row]}", flush=True)
            continue
        out = f16 if row == "f16" else work / (row if args.seed == 0 else f"{row}-seed{args.seed}")
        resume = args.resume and ROWS[row][0] == "llmquant"
        seconds = quantize_row(row, out, model, f16, args.llama_cpp_python, args.seed, resume) if row != "f16" else None
        size = (out / "model.gguf").stat().st_size
        entry = {"quantize_s": None if resume else seconds, **({"resumed": True} if resume else {}), "file_mb": size / 1e6, "bits_per_weight": 8 * size / params,
                 **score(out / "model.gguf", windows, args.llama_cpp_python)}
        table[row] = entry
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name} {row}{f' seed {args.seed}' if args.seed else ''}: {entry}", flush=True)


def _numel(model: Path) -> list[int]:
    from llmquant.host.checkpoint import Checkpoint

    checkpoint = Checkpoint(model)
    sizes = []
    for info in checkpoint.infos.values():
        n = 1
        for d in info.shape:
            n *= int(d)
        sizes.append(n)
    return sizes


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One table per model: perplexity in llama.cpp (and its spread over calibration seeds), size, bits per weight."""
    parts = []
    for name, data in results.items():
        rows, seeds, settings = data["rows"], data.get("seed_runs", {}), data["settings"]
        base = rows.get("f16", {}).get("perplexity")
        lines = [f"#### {name}\n", f"{settings['model']}; {settings['perplexity']}; {settings['calibration']}; "
                 f"{settings['groups']}.\n", "| row | perplexity (llama.cpp) | vs f16 | mean over seeds (min-max) | file MB | "
                 "bits/weight | quantize s |", "|---|---|---|---|---|---|---|"]
        for row in [r for r in ROWS if r in rows]:
            e = rows[row]
            over = [e["perplexity"]] + [s[row]["perplexity"] for s in seeds.values() if row in s]
            spread = f"{sum(over) / len(over):.2f} ({min(over):.2f}-{max(over):.2f}, {len(over)} seeds)" if len(over) > 1 else "-"
            ratio = f"{e['perplexity'] / base:.3f}" if base else "-"
            lines.append(f"| {row} | {e['perplexity']:.2f} | {ratio} | {spread} | {e['file_mb']:.1f} | "
                         f"{e['bits_per_weight']:.2f} | {_num(e.get('quantize_s'), 1)} |")
        lines.append(_verdict(rows, seeds))
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _verdict(rows: dict[str, Any], seeds: dict[str, Any]) -> str:
    """One sentence: llmquant's GPTQ in Q4_0 blocks (mean over its seeds) against llama.cpp's own Q4_0 and Q4_K_M."""
    if "gptq-q4_0" not in rows or "llama.cpp-q4_0" not in rows:
        return ""
    over = [rows["gptq-q4_0"]["perplexity"]] + [s["gptq-q4_0"]["perplexity"] for s in seeds.values() if "gptq-q4_0" in s]
    ours, theirs = sum(over) / len(over), rows["llama.cpp-q4_0"]["perplexity"]
    seeds_text = f"mean of {len(over)} seeds, worst {max(over):.2f}" if len(over) > 1 else "1 seed"
    text = (f"\nllmquant GPTQ in Q4_0 ({seeds_text}): {ours:.2f} against llama.cpp's own Q4_0 {theirs:.2f}, "
            f"{100 * (1 - ours / theirs):.1f}% lower")
    if "llama.cpp-q4_k_m" in rows:
        k = rows["llama.cpp-q4_k_m"]
        text += (f"; llama.cpp's Q4_K_M {k['perplexity']:.2f} at {k['bits_per_weight']:.2f} bits per weight against "
                 f"{rows['gptq-q4_0']['bits_per_weight']:.2f}")
    return text + "."


def rebuild(root: Path = ROOT) -> None:
    found = {p.stem.removeprefix("gguf_"): json.loads(p.read_text()) for p in sorted((root / "eval/benchmarks/results").glob("gguf_*.json"))}
    if not found:
        return
    tables = markdown(found)
    (root / "eval/benchmarks/results/gguf.md").write_text(tables)
    doc = root / "docs" / "benchmarks.md"
    text = doc.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        doc.write_text(f"{head}{START}\n{tables}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, qwen2.5-coder-1.5b (comma-separated)")
    parser.add_argument("--rows", default="all", help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, help="WikiText-2 windows of 2048 tokens (default: the peers benchmark's)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed of the GPTQ rows; 0 is the table's")
    parser.add_argument("--llama-cpp-python", default=os.environ.get("LLMQUANT_LLAMA_CPP_PYTHON", "/work/llama-venv/bin/python"))
    parser.add_argument("--work", default="/tmp/llmquant-bench-gguf")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted llmquant runs of the rows (their time is then not recorded)")
    parser.add_argument("--docs", action="store_true", help="only rebuild the docs section from the results")
    args = parser.parse_args()
    if not args.docs:
        for name in args.model.split(","):
            run_model(name, args)
    rebuild()


if __name__ == "__main__":
    main()
