"""``llmquant eval``: resolve the models and the evaluation text, measure, and write the report.

The measurements themselves live in the ``llmquant_eval`` package (``eval/`` in the source tree):
perplexity, tokens/s, memory, and the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llmquant.errors import LlmquantError

__all__ = ["run_eval"]

log = logging.getLogger(__name__)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.bfloat16
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LlmquantError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return dtype


def run_eval(args: Any) -> tuple[dict[str, Any], list[Path]]:
    """Evaluate ``args.model`` (and ``args.baseline``) as the ``eval`` command's flags say.

    Returns:
        The report, and the files written (JSON, markdown, PNG) when ``args.output`` is set.
    """
    from transformers import AutoTokenizer

    from llmquant.host.runner import resolve_device
    from llmquant.host.source import resolve_model
    from llmquant_eval.perplexity import load_text
    from llmquant_eval.report import build_report, write_report
    from llmquant_eval.run import PerplexitySettings, SpeedSettings, evaluate_model

    if args.ppl is None and not args.speed:
        raise LlmquantError("nothing to measure: pass --ppl DATA (e.g. --ppl wiki.test.raw) and/or --speed")
    update_card = getattr(args, "update_card", False)
    if update_card and (args.model is None or not (Path(args.model) / "llmquant.json").exists()):
        raise LlmquantError(f"--update-card: {args.model or 'the default model'} is not a folder written by `llmquant quantize`; "
                            f"pass one, or drop --update-card")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = _dtype(args.dtype, device)
    model = resolve_model(args.model)
    baseline = resolve_model(args.baseline) if args.baseline else None
    ppl = None
    if args.ppl is not None:
        try:
            text = load_text(args.ppl, split=args.ppl_split, column=args.ppl_column, config=args.ppl_config)
        except FileNotFoundError as exc:
            raise LlmquantError(f"--ppl {args.ppl}: {exc}") from exc
        token_ids = AutoTokenizer.from_pretrained(model)(text, return_tensors="pt").input_ids[0]
        if args.seqlen is not None and token_ids.numel() < args.seqlen:
            raise LlmquantError(f"--ppl {args.ppl}: {token_ids.numel()} tokens, fewer than one window of --seqlen {args.seqlen}")
        ppl = PerplexitySettings(token_ids, args.ppl, args.seqlen, args.stride, args.max_windows)
    speed = SpeedSettings(tuple(args.batch_size or [1]), args.prompt_tokens, args.new_tokens, args.runs, args.warmup) if args.speed else None
    rows = []
    for path, role in ((baseline, "baseline"), (model, "model")):
        if path is None:
            continue
        name = path.name if role == "model" or path.name != model.name else f"{path.name} (baseline)"
        log.info("evaluating %s (%s)", path, role)
        rows.append(evaluate_model(path, name=name, role=role, loader=args.loader, dtype=dtype, device=device,
                                   ppl=ppl, speed=speed).to_dict())
    settings: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "device": device, "loader": args.loader}
    if ppl is not None:
        first = next(r["perplexity"] for r in rows)
        settings["perplexity"] = (f"{args.ppl}: {first['windows']} windows of {first['seqlen']} tokens"
                                  f"{f', stride {args.stride}' if args.stride else ', non-overlapping'}, {first['tokens_scored']} tokens scored")
    if speed is not None:
        settings["speed"] = (f"batch {'/'.join(map(str, speed.batch_sizes))}, prompt {speed.prompt_tokens} tokens, "
                             f"{speed.new_tokens} new tokens, {speed.warmup} warm-up + {speed.runs} timed runs")
    report = build_report(rows, settings)
    written = write_report(report, Path(args.output)) if args.output else []
    if update_card:
        from llmquant.card import update_card as write_measured
        from llmquant_eval.report import markdown

        written.append(write_measured(Path(args.model), markdown(report)))
    return report, written
