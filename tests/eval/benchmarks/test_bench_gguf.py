from __future__ import annotations

import json
from pathlib import Path

from eval.benchmarks.bench_gguf import END, ROWS, START, markdown, rebuild


def _results() -> dict:
    settings = {"model": "SmolLM2", "params": 1e8, "perplexity": "10 windows", "calibration": "64 x 512", "groups": "32"}
    rows = {"f16": {"quantize_s": None, "file_mb": 270.9, "bits_per_weight": 16.1, "perplexity": 20.0},
            "llama.cpp-q4_0": {"quantize_s": 0.8, "file_mb": 91.7, "bits_per_weight": 5.46, "perplexity": 25.0},
            "gptq-q4_0": {"quantize_s": 60.0, "file_mb": 91.7, "bits_per_weight": 5.46, "perplexity": 23.0}}
    return {"settings": settings, "rows": rows, "seed_runs": {"1": {"gptq-q4_0": {"perplexity": 24.0}}}}


def test_every_row_of_the_table_is_a_known_row_in_the_drivers_order() -> None:
    table = markdown({"smollm2": _results()})
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [line.split(" | ")[0][2:] for line in lines] == ["f16", "llama.cpp-q4_0", "gptq-q4_0"]
    assert "| llama.cpp-q4_0 | 25.00 | 1.250 | - | 91.7 | 5.46 | 0.8 |" in table
    assert "| gptq-q4_0 | 23.00 | 1.150 | 23.50 (23.00-24.00, 2 seeds) | 91.7 | 5.46 | 60.0 |" in table
    assert "llmquant GPTQ in Q4_0 (mean of 2 seeds, worst 24.00): 23.50 against llama.cpp's own Q4_0 25.00, 6.0% lower." in table
    assert set(ROWS) >= {"llama.cpp-q4_0", "llama.cpp-q4_k_m", "llama.cpp-q4_k_m-pure", "gptq-q4_0", "gptq-q4_k"}


def test_the_docs_section_is_rebuilt_from_the_results(tmp_path: Path) -> None:
    (tmp_path / "eval/benchmarks/results").mkdir(parents=True)
    (tmp_path / "eval/benchmarks/results/gguf_smollm2.json").write_text(json.dumps(_results()))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/benchmarks.md").write_text(f"before\n{START}\nold\n{END}\nafter\n")
    rebuild(tmp_path)
    doc = (tmp_path / "docs/benchmarks.md").read_text()
    assert doc.startswith(f"before\n{START}\n#### smollm2") and doc.endswith(f"{END}\nafter\n") and "old" not in doc


def test_a_resumed_row_keeps_its_partial_run_and_passes_resume(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from eval.benchmarks import bench_gguf

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args) or subprocess.CompletedProcess(args, 0, "", ""))
    out = tmp_path / "rtn-q4_0"
    (out / "kept").mkdir(parents=True)
    bench_gguf.quantize_row("rtn-q4_0", out, tmp_path, tmp_path, "python", 0, resume=True)
    assert (out / "kept").exists() and "--resume" in calls[-1]
    bench_gguf.quantize_row("rtn-q4_0", out, tmp_path, tmp_path, "python", 0)
    assert not out.exists() and "--resume" not in calls[-1]
