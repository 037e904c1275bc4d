"""The evaluation report: JSON with every number, a markdown table, a terminal table, a PNG plot.

A report holds one or more `ModelEval` rows plus the versions, settings and machine they were
measured with. With a baseline, each other row also gets deltas and ratios against it. Several
reports can be merged into one plot (perplexity against bits per weight, speed and memory).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["build_report", "comparisons", "load_report", "markdown", "plot", "plot_panels", "terminal_table", "write_report"]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("llmquant", "torch", "transformers", "gptqmodel", "compressed-tensors", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def comparisons(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return per non-baseline row its deltas and ratios against the baseline row (if any)."""
    base = next((r for r in rows if r["role"] == "baseline"), None)
    if base is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row is base:
            continue
        c: dict[str, Any] = {"disk_ratio": row["disk_bytes"] / max(base["disk_bytes"], 1),
                             "memory_ratio": row["memory_bytes"] / max(base["memory_bytes"], 1),
                             "peak_rss_ratio": row["peak_rss_mb"] / max(base["peak_rss_mb"], 1e-9)}
        if row.get("perplexity") and base.get("perplexity"):
            p, q = row["perplexity"]["perplexity"], base["perplexity"]["perplexity"]
            c.update(perplexity_delta=p - q, perplexity_ratio=p / q)
        for mine, theirs in zip(row.get("speed", []), base.get("speed", [])):
            b = mine["batch_size"]
            c[f"prefill_ratio_b{b}"] = mine["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]
            c[f"decode_ratio_b{b}"] = mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        out[row["name"]] = c
    return out


def build_report(rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    from llmquant import __version__

    return {"report_version": 1, "llmquant_version": __version__, "versions": _versions(), "machine": _machine(),
            "settings": settings, "models": rows, "comparison": comparisons(rows)}


def write_report(report: dict[str, Any], path: Path) -> list[Path]:
    """Write the JSON report at `path`, and the markdown table and the plot beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(report))
    png = path.with_suffix(".png")
    plot([report], png)
    return [path, md, png]


def load_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(Path(path).read_text())
    if report.get("report_version") != 1 or "models" not in report:
        raise ValueError(f"{path} is not an llmquant eval report (no report_version 1 / models)")
    return report


def _cells(row: dict[str, Any], comparison: dict[str, Any]) -> list[str]:
    ppl = row.get("perplexity")
    speed = row.get("speed") or []
    first = speed[0] if speed else None
    cells = [row["name"], row["quantization"].get("method") or "float", f"{row['bits_per_weight']:.2f}",
             f"{ppl['perplexity']:.3f}" if ppl else "-",
             f"{comparison['perplexity_delta']:+.3f}" if "perplexity_delta" in comparison else "-",
             f"{first['prefill_tokens_per_s']:.1f}" if first else "-", f"{first['decode_tokens_per_s']:.2f}" if first else "-",
             _decode_ratio(first, comparison),
             f"{row['disk_bytes'] / 1e6:.1f}", f"{row['memory_bytes'] / 1e6:.1f}", f"{row['peak_rss_mb']:.0f}"]
    return cells


def _decode_ratio(first: dict[str, Any] | None, comparison: dict[str, Any]) -> str:
    key = f"decode_ratio_b{first['batch_size']}" if first else ""
    return f"{comparison[key]:.2f}x" if key in comparison else "-"


HEADER = ["model", "quant", "bits/w", "ppl", "ppl delta", "prefill tok/s", "decode tok/s", "decode vs base",
          "disk MB", "memory MB", "peak RSS MiB"]


def markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in report["models"]:
        lines.append("| " + " | ".join(_cells(row, report["comparison"].get(row["name"], {}))) + " |")
    s = report["settings"]
    m = report["machine"]
    lines.append("")
    lines.append(f"dtype {s.get('dtype')}, device {s.get('device')}, {m['threads']} threads on {m['cpus']} CPUs ({m['machine']}); "
                 f"perplexity: {s.get('perplexity', 'not measured')}; speed: {s.get('speed', 'not measured')}; "
                 f"speeds are the median of the runs (spread in the JSON).")
    return "\n".join(lines) + "\n"


def terminal_table(report: dict[str, Any]) -> str:
    rows = [HEADER] + [_cells(r, report["comparison"].get(r["name"], {})) for r in report["models"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def plot(reports: Sequence[dict[str, Any]], path: Path) -> Path:
    """Plot what the reports measured, one panel per kind, every model of every report in each:
    perplexity against bits per weight (when measured), prefill and decode tokens/s at the first
    batch size (when measured), and memory (disk, weights in memory, peak RSS; always measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for report in reports for r in report["models"]]
    draw = {"perplexity": _perplexity_panel, "prefill": _speed_panel("prefill"), "decode": _speed_panel("decode"),
            "memory": _memory_panel}
    panels = [draw[name] for name in plot_panels(reports)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax, rows)
        ax.grid(alpha=0.3)
    fig.suptitle("llmquant eval")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_panels(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Return the panels `plot` draws for these reports, in order: those with something measured."""
    rows = [r for report in reports for r in report["models"]]
    panels = ["perplexity"] if any(r.get("perplexity") for r in rows) else []
    if any(r.get("speed") for r in rows):
        panels += ["prefill", "decode"]
    return panels + ["memory"]


def _perplexity_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("perplexity"):
            bpw, ppl = r["bits_per_weight"], r["perplexity"]["perplexity"]
            ax.scatter([bpw], [ppl])
            ax.annotate(f"{r['name']} ({r['disk_bytes'] / 1e6:.0f} MB)", (bpw, ppl), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("bits per weight (block Linears)")
    ax.set_ylabel("perplexity")
    ax.set_title("quality against size")


def _bars(ax: Any, names: list[str], series: dict[str, list[float]], unit: str) -> None:
    height = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ys = [i + k * height for i in range(len(names))]
        ax.barh(ys, values, height=height, label=label)
        for y, v in zip(ys, values):
            ax.annotate(f"{v:.1f}", (v, y), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
    ax.set_xlabel(unit)
    ax.margins(x=0.15)
    if len(series) > 1:
        ax.legend(fontsize=7)


def _speed_panel(kind: str) -> Any:
    def draw(ax: Any, rows: list[dict[str, Any]]) -> None:
        timed = [r for r in rows if r.get("speed")]
        batch = timed[0]["speed"][0]["batch_size"]
        values = [next((s[f"{kind}_tokens_per_s"] for s in r["speed"] if s["batch_size"] == batch), 0.0) for r in timed]
        _bars(ax, [r["name"] for r in timed], {kind: values}, "tokens/s")
        ax.set_title(f"{kind} tokens/s, batch {batch} (median)")
    return draw


def _memory_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    series = {"disk MB": [r["disk_bytes"] / 1e6 for r in rows], "weights in memory MB": [r["memory_bytes"] / 1e6 for r in rows],
              "peak RSS MiB": [r["peak_rss_mb"] for r in rows]}
    _bars(ax, [r["name"] for r in rows], series, "MB")
    ax.set_title("memory")
