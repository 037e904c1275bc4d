"""Rebuild the peers section of docs/benchmarks.md, its markdown tables and its plot from results/peers_*.json.

    python eval/benchmarks/peers_report.py [ROOT]

(or ``python -m eval.benchmarks.peers_report``). Reads only the committed JSON in
``eval/benchmarks/results/``, so anyone can regenerate the section after adding a model or a row
with ``eval/benchmarks/bench_peers.py``. The section sits between the two marker comments of
``docs/benchmarks.md``; the tables also go to ``results/peers.md`` and the plot to
``results/peers_scaling.png``. The rows themselves are described in ``peers_rows.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if not __package__:  # run as a script (python eval/benchmarks/peers_report.py): make `eval.benchmarks` importable
    sys.path.insert(0, str(ROOT))

from eval.benchmarks.memory_model import Shapes, predict_peak_mb, single_pass_chosen  # noqa: E402
from eval.benchmarks.peers_rows import CALIB_SAMPLES, CALIB_SEQLEN, PEERS, ROWS, needs_samples, row_bits  # noqa: E402

__all__ = ["DOC", "END", "RESULTS", "START", "markdown_tables", "rebuild", "scaling_plot"]

START, END = "<!-- peers:start (eval/benchmarks/peers_report.py writes this section) -->", "<!-- peers:end -->"
RESULTS = Path("eval") / "benchmarks" / "results"  # under the repository root: the JSON read, the tables and plot written
DOC = Path("docs") / "benchmarks.md"  # under the repository root: the page holding the section
ORDER = ["smollm2", "gemma3", "qwen2.5-coder-1.5b"]


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    found = {p.stem.removeprefix("peers_"): json.loads(p.read_text()) for p in sorted(folder.glob("peers_*.json"))}
    return {name: found[name] for name in sorted(found, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))}


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def predicted_mb(name: str, settings: dict[str, Any]) -> float | None:
    """The memory formula's peak for an llmquant row (None for the peers'), from the recorded shapes and baseline."""
    if name not in ROWS or ROWS[name][0] != "llmquant" or "shapes" not in settings:
        return None
    shapes, row = Shapes(**settings["shapes"]), ROWS[name][1]
    transforms = row.get("transforms", ())
    tokens = CALIB_SAMPLES * CALIB_SEQLEN if needs_samples(name) else (4 * 64 if transforms else 0)
    float_inputs = bool(row.get("gptaq"))
    single = bool(tokens) and single_pass_chosen(shapes, tokens) and not float_inputs
    return predict_peak_mb(shapes, settings["baseline_mb"], calibration_tokens=tokens, batch_tokens=8 * CALIB_SEQLEN,
                           single_pass=single, moe_calibration=row.get("moe_calibration", "routed"),
                           transformed=bool(transforms), search_tokens=row.get("awq_tokens", 2048) if "awq" in transforms else 0,
                           float_inputs=float_inputs)


def in_matrix_order(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """Rows in the benchmark's order (fp32, llmquant's, the peers'), whatever order they were run in."""
    order = {name: i for i, name in enumerate(["fp32", *ROWS])}
    return sorted(rows.items(), key=lambda item: order.get(item[0], len(order)))


def markdown_table(results: dict[str, Any]) -> str:
    """One model's rows: quality, cost of quantizing, and what the output costs to run."""
    rows, settings = results["rows"], results["settings"]
    ppl0 = rows.get("fp32", {}).get("perplexity")
    decode0 = rows.get("fp32", {}).get("decode_tok_s_fp32")
    peer_gptq = {bits: rows.get(f"gptqmodel-gptq-w{bits}", {}).get("quantize_s") for bits in (3, 4)}
    read = settings.get("read_mb_s")
    notes: list[str] = []
    lines = ["| row | perplexity | vs fp32 | quantize s | vs GPTQModel GPTQ | weights MB/s (vs raw read) | peak RSS / anon MB | predicted MB | disk MB | decode tok/s | vs fp32 | decode runtime |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in in_matrix_order(rows):
        if name == "fp32":
            cells = [_num(ppl0, 2), "1.000", "-", "-", "-", "-", "-", _num(settings.get("checkpoint_mb")),
                     f"{_num(decode0, 1)} (bf16 {_num(row.get('decode_tok_s_bf16'), 1)})", "1.00x", row.get("decode_runtime", "-")]
        elif "error" in row:
            cells = [f"failed: {row['error']}", *["-"] * 5, _num(row.get("sampled_peak_rss_mb")) + " (sampled)", *["-"] * 5]
        else:
            ppl, seconds, decode = row.get("perplexity"), row.get("quantize_s"), row.get("decode_tok_s")
            gptq = "gptq" in name or "awq" in name  # calibrated rows: against GPTQModel GPTQ at the same bits
            peer_s = peer_gptq.get(row_bits(name))
            cells = [_num(ppl, 2), f"{ppl / ppl0:.3f}" if ppl and ppl0 else "-", _num(seconds, 1),
                     f"{seconds / peer_s:.2f}x" if gptq and seconds and peer_s else "-",
                     f"{row['mb_s']:.0f} ({row['mb_s'] / read:.2g}x read)" if row.get("mb_s") and read else "-",
                     f"{_num(row.get('peak_rss_mb'))} / {_num(row.get('sampled_peak_anon_mb'))}",
                     _num(predicted_mb(name, settings)), _num(row.get("disk_mb")),
                     _num(decode, 1), f"{decode / decode0:.2f}x" if decode and decode0 else "-", row.get("decode_runtime", "-")]
        mark = f" [{len(notes) + 1}]" if row.get("note") else ""
        if mark:
            notes.append(f"[{len(notes) + 1}] {name}: {row['note']}")
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    fallbacks = [f"{name} {row['expert_fallback_share']:.1%}" for name, row in in_matrix_order(rows) if "expert_fallback_share" in row]
    if fallbacks:
        notes.append("Routed-expert projections quantized without calibration (too few routed tokens): " + ", ".join(fallbacks))
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def limit_table(results: dict[str, Any]) -> str:
    """Runs under a hard memory limit: which finished, and where the others were killed."""
    runs = results.get("limit_runs", {})
    if not runs:
        return ""
    lines = ["| row | hard limit MiB | result | wall s | peak RSS MB | peak anon MB (sampled) |", "|---|---|---|---|---|---|"]
    for name, run in in_matrix_order(runs):
        result = "finished" if run["finished"] else run.get("error", "failed")
        lines.append(f"| {name} | {run['limit_mb']:.0f} | {result} | {run['wall_s']:.0f} | {_num(run.get('peak_rss_mb'))} | "
                     f"{_num(run.get('sampled_peak_anon_mb'))} |")
    return "\n".join(lines) + "\n"


def seed_table(results: dict[str, Any]) -> str:
    """Each row run with more than one calibration seed: its perplexity's mean and spread over the seeds."""
    runs = results.get("seed_runs", {})
    lines = []
    for name, row in in_matrix_order(results["rows"]):
        by_seed = {0: row.get("perplexity")} | {int(seed): rows[name].get("perplexity") for seed, rows in runs.items() if name in rows}
        ppl = {seed: value for seed, value in sorted(by_seed.items()) if value is not None}
        if len(ppl) < 2:
            continue
        values = list(ppl.values())
        lines.append(f"| {name} | {len(values)} | {sum(values) / len(values):.2f} | {min(values):.2f} - {max(values):.2f} | "
                     + ", ".join(f"{seed}: {value:.2f}" for seed, value in ppl.items()) + " |")
    if not lines:
        return ""
    return "\n".join(["| row | seeds | mean perplexity | min - max | by seed |", "|---|---|---|---|---|", *lines]) + "\n"


def settings_line(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (f"{s['model']}, {s['params'] / 1e9:.2f}B parameters, checkpoint {s['checkpoint_mb']:.0f} MB; {s['bits']}-bit, group "
            f"{s['group_size']}, symmetric (NF4: blocks of {s['nf4_blocksize']}); calibration {s['calibration']}; "
            f"perplexity: {s['perplexity']}; decode: {s['decode']}; {s['threads']} threads on {s['machine']}, torch "
            f"{s['torch']}; raw read speed of the checkpoint {s['read_mb_s']:.0f} MB/s; baseline process "
            f"{s['baseline_mb']:.0f} MB.")


def markdown_tables(all_results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, results in all_results.items():
        parts.append(f"#### {name}\n\n{settings_line(results)}\n\n{markdown_table(results)}")
        if seeds := seed_table(results):
            parts.append(f"Perplexity over calibration seeds (other windows of the same text; `bench_peers.py --seed N`):\n\n{seeds}")
        if limits := limit_table(results):
            parts.append(f"Under a hard memory limit (a cgroup v1 memory group; killed past it):\n\n{limits}")
    return "\n".join(parts)


def scaling_plot(all_results: dict[str, dict[str, Any]], path: Path) -> None:
    """Quantization time and peak RSS against model size, one line per row present on 2+ models."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    all_results = {n: r for n, r in all_results.items() if not r["settings"].get("shapes", {}).get("experts")}  # dense only
    names = sorted({row for r in all_results.values() for row in r["rows"] if row != "fp32"})
    colors = plt.get_cmap("tab20").colors  # one color per row: tab10's cycle repeated after ten rows
    model_sizes = sorted(r["settings"]["params"] / 1e9 for r in all_results.values())
    for i, row in enumerate(names):
        points = [(r["settings"]["params"] / 1e9, r["rows"][row]) for r in all_results.values()
                  if row in r["rows"] and "quantize_s" in r["rows"][row]]
        if len(points) < 2:
            continue
        style = "--" if row.startswith(PEERS) else "-"
        sizes = [p for p, _ in points]
        color = colors[i % len(colors)]
        time_ax.plot(sizes, [e["quantize_s"] for _, e in points], style, color=color, marker="o", label=row)
        memory_ax.plot(sizes, [e["peak_rss_mb"] for _, e in points], style, color=color, marker="o", label=row)
    for ax, label in ((time_ax, "quantize wall time, s"), (memory_ax, "peak RSS while quantizing, MB")):
        ax.set_xlabel("parameters, billions")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(model_sizes, [f"{size:.2f}" for size in model_sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(alpha=0.3)
    memory_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Cost of quantizing against model size (solid: llmquant, dashed: peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rebuild(root: Path = ROOT) -> None:
    """Write the tables and the plot from `root`'s results, and replace the section of `root`'s docs/benchmarks.md."""
    folder = root / RESULTS
    all_results = load_results(folder)
    if not all_results:
        print(f"no {RESULTS}/peers_*.json yet: run eval/benchmarks/bench_peers.py first")
        return
    tables = markdown_tables(all_results)
    (folder / "peers.md").write_text(tables)
    scaling_plot(all_results, folder / "peers_scaling.png")
    doc = root / DOC
    text = doc.read_text() if doc.exists() else ""
    found = START in text and END in text
    if found:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        plot = Path(os.path.relpath(folder / "peers_scaling.png", doc.parent)).as_posix()
        doc.write_text(f"{head}{START}\n{tables}\n![cost against model size]({plot})\n{END}{tail}")
    print(f"wrote {folder / 'peers.md'} and {folder / 'peers_scaling.png'}; "
          + (f"{DOC} section rebuilt" if found else f"{DOC} has no section between {START} and {END}: left alone"))


if __name__ == "__main__":
    rebuild(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
