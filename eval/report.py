"""The evaluation report: JSON with every number, a markdown table, a terminal table, a PNG plot.

A report holds one or more `ModelEval` rows plus the versions, settings and machine they were
measured with. With a baseline, each other row also gets deltas and ratios against it. Several
reports can be merged into one plot (perplexity against bits per weight, one point per model).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["build_report", "comparisons", "load_report", "markdown", "plot", "terminal_table", "write_report"]


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
    """Plot perplexity against bits per weight, one labelled point per model of every report
    (disk size in the label); models without perplexity are left out of the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = [(r["bits_per_weight"], r["perplexity"]["perplexity"], r["name"], r["disk_bytes"])
              for report in reports for r in report["models"] if r.get("perplexity")]
    for bpw, ppl, name, size in points:
        ax.scatter([bpw], [ppl])
        ax.annotate(f"{name} ({size / 1e6:.0f} MB)", (bpw, ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not points:
        ax.text(0.5, 0.5, "no perplexity measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("bits per weight (block Linears)")
    ax.set_ylabel("perplexity")
    ax.set_title("llmquant eval: quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
