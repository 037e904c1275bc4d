"""The peers benchmark's machinery: measured child processes, the hard memory limit, the memory
formula, one quantize child, and the docs section rebuilt from results (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from eval.benchmarks.limits import CGROUP_ROOT, can_limit_memory, run_measured
from eval.benchmarks.memory_model import Shapes, predict_peak_mb, shapes_of, single_pass_chosen
from eval.benchmarks.peers_report import DOC, END, RESULTS, START, predicted_mb, rebuild
from eval.benchmarks.peers_rows import LLMQUANT_RUNTIME, decode_runtime

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "eval" / "benchmarks" / "bench_peers.py"
MB = 1024 * 1024
ALLOCATE = "import time; block = bytearray({mb} * 1024 * 1024); time.sleep(0.8); print('done')"
can_limit = pytest.mark.skipif(not can_limit_memory(), reason="a hard memory limit needs root and a writable cgroup v1 memory controller")


def test_run_measured_sees_a_childs_peak_memory() -> None:
    done = run_measured([sys.executable, "-c", ALLOCATE.format(mb=200)], interval=0.05)
    assert done.ok and done.stdout.strip() == "done" and not done.oom_killed
    assert 200 <= done.peak_anon_mb <= done.peak_rss_mb < 400
    assert done.seconds >= 0.8 and done.limit_mb is None and done.cgroup_peak_mb is None


@can_limit
def test_a_child_past_the_hard_limit_is_killed_and_one_under_it_is_not() -> None:
    killed = run_measured([sys.executable, "-c", ALLOCATE.format(mb=300)], memory_limit_mb=150)
    assert not killed.ok and killed.oom_killed and killed.cgroup_peak_mb == pytest.approx(150, abs=1)
    fits = run_measured([sys.executable, "-c", ALLOCATE.format(mb=100)], memory_limit_mb=400)
    assert fits.ok and not fits.oom_killed and 100 < fits.cgroup_peak_mb < 400
    assert not [p for p in CGROUP_ROOT.iterdir() if p.name.startswith(f"llmquant-bench-{os.getpid()}-")]


def test_shapes_are_read_from_the_checkpoint(tiny_llama: Path) -> None:
    shapes = shapes_of(tiny_llama)
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    block0 = [s for k, s in sizes.items() if ".layers.0." in k]
    assert shapes.block_params == sum(math.prod(s) for s in block0)
    assert shapes.widest_input == 256 and shapes.largest_weight == 256 * 128  # mlp: 128 -> 256 -> 128
    assert (shapes.hidden, shapes.vocab, shapes.layers, shapes.source_bytes) == (128, 512, 2, 4)
    assert shapes.largest_outside == 512 * 128 and shapes.params == sum(math.prod(s) for s in sizes.values())


def test_memory_formula_terms() -> None:
    # a Qwen2.5-1.5B-like block: w = 46.8M, widest input 8960, float32 source, bf16 activations
    shapes = Shapes(block_params=46_797_824, largest_weight=8960 * 1536, widest_input=8960, hidden=1536, vocab=151_936,
                    largest_outside=151_936 * 1536, source_bytes=4, layers=28, params=1_777_088_000)
    rtn = predict_peak_mb(shapes, 500)
    assert rtn == pytest.approx(500 + 151_936 * 1536 * 4 / MB)  # the embedding copy dominates a block
    N = 64 * 512
    replay = predict_peak_mb(shapes, 500, calibration_tokens=N, batch_tokens=8 * 512)
    block = 46_797_824 * 6 + 2 * N * 1536 * 2 + 16 * 8 * 512 * 1536 * 2 + 8 * 8960**2 + 16 * 8960 * 1536
    assert replay == pytest.approx(500 + block / MB)
    single = predict_peak_mb(shapes, 500, calibration_tokens=N, batch_tokens=8 * 512, single_pass=True)
    assert single - replay == pytest.approx(16 * (N - 8 * 512) * 1536 * 2 / MB)


def test_predicted_peak_follows_the_hosts_choice_of_calibration_mode() -> None:
    smollm2 = {"block_params": 3_540_096, "largest_weight": 1536 * 576, "widest_input": 1536, "hidden": 576,
               "vocab": 49_152, "largest_outside": 49_152 * 576, "source_bytes": 4, "layers": 30, "params": 134_515_008}
    settings = {"shapes": smollm2, "baseline_mb": 300.0}
    shapes = Shapes(**smollm2)
    tokens = 64 * 512
    assert single_pass_chosen(shapes, tokens)  # 32,768 x 576 x 2 x 18 = 0.68 GB fits the default 1 GB
    assert not single_pass_chosen(Shapes(**{**smollm2, "hidden": 1536}), tokens)  # Qwen's width: 1.81 GB
    expected = predict_peak_mb(shapes, 300.0, calibration_tokens=tokens, batch_tokens=8 * 512, single_pass=True)
    assert predicted_mb("gptq-w4", settings) == pytest.approx(expected)
    assert predicted_mb("rtn-w4", settings) == pytest.approx(predict_peak_mb(shapes, 300.0))
    assert predicted_mb("gptqmodel-gptq-w4", settings) is None and predicted_mb("gptq-w4", {"baseline_mb": 1.0}) is None


def test_quantize_child_writes_an_output_and_reports_its_cost(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "rtn"
    command = [sys.executable, str(SCRIPT), "--quantize", "rtn-w4", "--out", str(out),
               "--model-dir", str(tiny_llama), "--group-size", "64", "--threads", "1"]
    done = run_measured(command, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.ok, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["seconds"] > 0 and report["peak_rss_mb"] > 50
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 64, True)


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").exists(),
                    reason="needs ../shared/data (WikiText-2)")
def test_score_child_reports_perplexity_and_decode_speed(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "rtn"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--out", str(out), "--model-dir", str(tiny_llama), "--group-size", "64", "--threads", "1"]
    script = str(SCRIPT)
    assert run_measured([sys.executable, script, "--quantize", "rtn-w4", *common], env=env).ok
    for row, path in (("rtn-w4", out), ("fp32", tiny_llama)):
        done = run_measured([sys.executable, script, "--score", row, *common[2:], "--out", str(path), "--ppl-seqlen", "64",
                             "--ppl-windows", "2", "--speed-runs", "1"], env=env)
        assert done.ok, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert 1 < result["perplexity"] < 10_000
        speeds = ["decode_tok_s"] if row != "fp32" else ["decode_tok_s_fp32", "decode_tok_s_bf16"]
        assert all(result[key] > 0 for key in speeds), result
        assert result["decode_runtime"] == ("transformers" if row == "fp32" else "llmquant int4 kernel")


def test_each_output_decodes_in_the_runtime_its_format_was_written_for() -> None:
    assert decode_runtime("gptq-w4") == decode_runtime("rtn-w4") == LLMQUANT_RUNTIME
    assert decode_runtime("nf4") == decode_runtime("bitsandbytes-nf4") == "transformers + bitsandbytes"
    assert decode_runtime("gptq-w3") == decode_runtime("gptqmodel-gptq-w4") == "transformers + gptqmodel"
    assert decode_runtime("llmcompressor-gptq-w4-no-act-order") == "transformers + compressed-tensors"


def _results(model: str, params: float, gptq_s: float, peer_s: float) -> dict:
    settings = {"model": model, "params": params, "checkpoint_mb": params * 4e-6, "bits": 4, "group_size": 64,
                "nf4_blocksize": 64, "calibration": "64 x 512", "perplexity": "10 windows", "decode": "batch 1",
                "threads": 2, "machine": "x86_64, 2 cpus", "torch": "2.13.0", "read_mb_s": 900.0, "baseline_mb": 500.0}
    rows = {"fp32": {"perplexity": 20.0, "decode_tok_s_fp32": 10.0, "decode_tok_s_bf16": 15.0},
            "gptq-w4": {"perplexity": 22.0, "quantize_s": gptq_s, "peak_rss_mb": 600.0, "sampled_peak_anon_mb": 550.0,
                        "disk_mb": 100.0, "mb_s": 3.0, "decode_tok_s": 20.0, "decode_runtime": "llmquant int4 kernel"},
            "gptqmodel-gptq-w4": {"perplexity": 23.0, "quantize_s": peer_s, "peak_rss_mb": 1200.0, "disk_mb": 90.0,
                                  "mb_s": 1.0, "decode_tok_s": 11.0, "note": "timed on a busy machine"},
            "gptq-w3": {"perplexity": 30.0, "quantize_s": gptq_s, "peak_rss_mb": 600.0, "decode_tok_s": 2.0},
            "gptqmodel-gptq-w3": {"perplexity": 32.0, "quantize_s": 4 * gptq_s, "peak_rss_mb": 1200.0},
            "llmcompressor-gptq-w4": {"error": "killed by the 2560 MiB memory limit after 12 s", "sampled_peak_rss_mb": 2400.0}}
    limit_runs = {"gptq-w4": {"limit_mb": 2560, "finished": True, "wall_s": 61.0, "peak_rss_mb": 2100.0,
                              "sampled_peak_anon_mb": 2000.0, "cgroup_peak_mb": 2559.0},
                  "gptqmodel-gptq-w4": {"limit_mb": 2560, "finished": False, "wall_s": 9.0, "peak_rss_mb": None,
                                        "cgroup_peak_mb": 2560.0, "error": "killed by the 2560 MiB memory limit after 9 s"}}
    seed_runs = {"1": {"gptq-w4": {"perplexity": 23.0}, "gptqmodel-gptq-w4": {"perplexity": 24.5}},
                 "2": {"gptq-w4": {"perplexity": 22.5}}}
    return {"settings": settings, "rows": rows, "limit_runs": limit_runs, "seed_runs": seed_runs}


def test_docs_section_is_rebuilt_from_results_alone(tmp_path: Path) -> None:
    results = tmp_path / RESULTS
    results.mkdir(parents=True)
    (results / "peers_smollm2.json").write_text(json.dumps(_results("SmolLM2", 1.35e8, 50.0, 100.0)))
    (results / "peers_gemma3.json").write_text(json.dumps(_results("Gemma", 2.7e8, 90.0, 150.0)))
    (tmp_path / DOC).parent.mkdir()
    (tmp_path / DOC).write_text(f"# title\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n")
    rebuild(tmp_path)
    doc = (tmp_path / DOC).read_text()
    assert doc.startswith("# title\n\nbefore\n\n") and doc.endswith(f"{END}\n\nafter\n") and "old table" not in doc
    assert doc.index("#### smollm2") < doc.index("#### gemma3")  # model order: smallest first
    assert ("| gptq-w4 | 22.00 | 1.100 | 50.0 | 0.50x | 3 (0.0033x read) | 600 / 550 | - | 100 | 20.0 | 2.00x "
            "| llmquant int4 kernel |") in doc
    assert "| gptq-w3 | 30.00 | 1.500 | 50.0 | 0.25x |" in doc  # against GPTQModel at the same bits
    assert "| gptqmodel-gptq-w3 | 32.00 | 1.600 | 200.0 | 1.00x |" in doc
    assert "| gptqmodel-gptq-w4 [1] | 23.00 |" in doc and "\n[1] gptqmodel-gptq-w4: timed on a busy machine\n" in doc
    assert "| llmcompressor-gptq-w4 | failed: killed by the 2560 MiB memory limit after 12 s |" in doc
    assert "| gptq-w4 | 2560 | finished | 61 | 2100 | 2000 |" in doc
    assert "| gptqmodel-gptq-w4 | 2560 | killed by the 2560 MiB memory limit after 9 s | 9 | - | - |" in doc
    assert "| gptq-w4 | 3 | 22.50 | 22.00 - 23.00 | 0: 22.00, 1: 23.00, 2: 22.50 |" in doc  # seed 0 is the table's row
    assert "| gptqmodel-gptq-w4 | 2 | 23.75 | 23.00 - 24.50 | 0: 23.00, 1: 24.50 |" in doc
    assert "| gptq-w3 | " not in doc.split("Perplexity over calibration seeds")[1].split("####")[0]  # one seed: no row
    assert (results / "peers.md").read_text() in doc
    assert "![cost against model size](../eval/benchmarks/results/peers_scaling.png)" in doc  # relative to docs/
    assert (results / "peers_scaling.png").read_bytes().startswith(b"\x89PNG")


def test_the_driver_and_the_report_share_the_rows_without_importing_each_other() -> None:
    """bench_peers calls the report; the report reads row definitions from peers_rows alone."""
    import ast

    report = ast.parse((ROOT / "eval" / "benchmarks" / "peers_report.py").read_text())
    imported = {node.module for node in ast.walk(report) if isinstance(node, ast.ImportFrom)}  # in functions too
    imported |= {alias.name for node in ast.walk(report) if isinstance(node, ast.Import) for alias in node.names}
    assert "eval.benchmarks.peers_rows" in imported and not [m for m in imported if m and "bench_peers" in m]


@pytest.mark.parametrize("command", [[str(SCRIPT)], ["-m", "eval.benchmarks.bench_peers"],
                                     [str(ROOT / "eval" / "benchmarks" / "bench_formats.py")],
                                     [str(ROOT / "eval" / "benchmarks" / "bench_gptq.py")],
                                     [str(ROOT / "eval" / "benchmarks" / "bench_speed.py")],
                                     [str(ROOT / "eval" / "benchmarks" / "bench_gguf.py")]],
                         ids=["bench_peers-script", "bench_peers-module", "bench_formats", "bench_gptq", "bench_speed", "bench_gguf"])
def test_the_drivers_run_from_the_repository_root(command: list[str]) -> None:
    done = run_measured([sys.executable, *command, "--help"], cwd=ROOT,
                        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.ok and "usage:" in done.stdout, done.stderr[-2000:]


def test_moe_shapes_and_the_experts_stage_of_the_formula(tmp_path: Path) -> None:
    from conftest import save_tiny_moe

    shapes = shapes_of(save_tiny_moe(tmp_path / "moe", "qwen3_moe"))
    assert (shapes.experts, shapes.expert_inner, shapes.top_k) == (8, 64, 2)
    dense = Shapes(**{**shapes.to_dict(), "experts": 0, "expert_inner": 0, "top_k": 0})
    N, d, I, b = 4096, 128, 64, 2
    routed = predict_peak_mb(shapes, 0, calibration_tokens=N, batch_tokens=1024)
    everything = predict_peak_mb(shapes, 0, calibration_tokens=N, batch_tokens=1024, moe_calibration="all")
    assert routed > predict_peak_mb(dense, 0, calibration_tokens=N, batch_tokens=1024)
    # all: one shared d x d Hessian instead of one per expert in the chunk (all 8 fit the default budget), and
    # every token of a batch through an expert instead of its average share (k / E)
    rows = (1024 - 1024 * 2 // 8) * (d * (b + 4) + I * (3 * b + 4))
    assert (routed - everything) * MB == pytest.approx(8 * 4 * d**2 - 4 * d**2 - rows)
    one = predict_peak_mb(shapes, 0, calibration_tokens=N, batch_tokens=1024, moe_memory=1)  # chunks of one expert
    assert (routed - one) * MB == pytest.approx(7 * 4 * (I**2 + d**2))
