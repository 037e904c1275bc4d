"""Speed harness, memory, report and plot of `llmquant eval` (no timing assertions: only shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.memory import disk_bytes, model_bytes
from eval.report import load_report, plot, plot_panels
from eval.speed import measure_speed
from llmquant.api import quantize
from llmquant.cli import main


def test_speed_harness_returns_well_formed_results(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    result = measure_speed(model, batch_size=2, prompt_tokens=8, new_tokens=3, runs=3, warmup=1)
    assert (result.batch_size, result.prompt_tokens, result.new_tokens, result.runs) == (2, 8, 3, 3)
    for median, (low, high) in ((result.prefill_tokens_per_s, result.prefill_spread),
                                (result.decode_tokens_per_s, result.decode_spread)):
        assert 0 < low <= median <= high
    assert result.threads == torch.get_num_threads() and result.device == "cpu"
    with pytest.raises(ValueError, match="must be >= 1"):
        measure_speed(model, runs=0)


def test_memory_counts_tied_weights_once(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert model_bytes(model) == sum(tensors.values())
    untied = model_bytes(model)
    model.lm_head.weight = model.model.embed_tokens.weight
    assert model_bytes(model) == untied - 512 * 128 * 4
    assert disk_bytes(tiny_llama) == (tiny_llama / "model.safetensors").stat().st_size


@pytest.fixture(scope="module")
def eval_report(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    quantize(tiny_llama, out / "w4", {"bits": 4, "group_size": 64})
    text = out / "text.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(600)))
    argv = ["eval", str(out / "w4"), "--baseline", str(tiny_llama), "--ppl", str(text), "--seqlen", "32", "--max-windows", "3",
            "--speed", "--runs", "2", "--prompt-tokens", "8", "--new-tokens", "2", "--batch-size", "1", "--batch-size", "2",
            "-o", str(out / "report.json")]
    assert main(argv) == 0
    return out / "report.json"


def test_report_round_trips_with_every_number(eval_report: Path) -> None:
    report = load_report(eval_report)
    assert json.loads(json.dumps(report)) == report
    assert {"torch", "transformers", "python", "llmquant"} <= set(report["versions"])
    assert report["machine"]["threads"] >= 1 and report["settings"]["dtype"] == "bfloat16"
    baseline, model = report["models"]
    assert (baseline["role"], model["role"]) == ("baseline", "model")
    assert baseline["bits_per_weight"] == 32 and 4 < model["bits_per_weight"] < 5
    assert model["perplexity"]["windows"] == 3 and model["perplexity"]["tokens_scored"] == 3 * 31
    assert [s["batch_size"] for s in model["speed"]] == [1, 2]
    assert model["disk_bytes"] < baseline["disk_bytes"] and model["memory_bytes"] < baseline["memory_bytes"]
    comparison = report["comparison"][model["name"]]
    assert comparison["perplexity_delta"] == pytest.approx(model["perplexity"]["perplexity"] - baseline["perplexity"]["perplexity"])
    assert {"decode_ratio_b1", "decode_ratio_b2", "prefill_ratio_b1", "disk_ratio", "memory_ratio"} <= set(comparison)
    table = eval_report.with_suffix(".md").read_text()
    assert table.startswith("| model |") and model["name"] in table


def test_plot_is_written_and_reports_merge(eval_report: Path, tmp_path: Path) -> None:
    png = eval_report.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    merged = tmp_path / "merged.png"
    assert main(["eval-plot", str(eval_report), str(eval_report), "-o", str(merged)]) == 0
    assert merged.stat().st_size > 5000
    assert plot([load_report(eval_report)], tmp_path / "again.png").exists()


def test_eval_without_a_measurement_is_a_clear_error(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_llama)]) == 1
    assert "nothing to measure: pass --ppl DATA" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"algo": "nf4"}, {"bits": 4, "group_size": 64, "format": "compressed-tensors"}],
                         ids=["bitsandbytes", "compressed-tensors"])
def test_transformers_loader_cross_checks_our_numbers(settings: dict[str, object], tiny_llama: Path, tmp_path: Path) -> None:
    """--loader transformers runs the format's real integration; on the same text its perplexity
    agrees with llmquant's runtime."""
    from eval.run import PerplexitySettings, evaluate_model

    pytest.importorskip("bitsandbytes")
    pytest.importorskip("compressed_tensors")
    quantize(tiny_llama, tmp_path / "out", settings)
    ids = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(0))
    ppl = PerplexitySettings(ids, "random ids", seqlen=32)
    results = {loader: evaluate_model(tmp_path / "out", name=loader, role="model", loader=loader, dtype=torch.float32,
                                      device="cpu", ppl=ppl, speed=None) for loader in ("llmquant", "transformers")}
    ours, theirs = (results[k].perplexity["perplexity"] for k in ("llmquant", "transformers"))  # type: ignore[index]
    assert theirs == pytest.approx(ours, rel=1e-3)


def test_plot_shows_every_kind_of_measurement(eval_report: Path) -> None:
    report = load_report(eval_report)
    assert plot_panels([report]) == ["perplexity", "prefill", "decode", "memory"]
    speed_only = {**report, "models": [{**r, "perplexity": None} for r in report["models"]]}
    assert plot_panels([speed_only]) == ["prefill", "decode", "memory"]
    memory_only = {**report, "models": [{**r, "perplexity": None, "speed": []} for r in report["models"]]}
    assert plot_panels([memory_only]) == ["memory"]


def test_speed_only_eval_plots_speed_and_updates_the_card(tiny_llama: Path, tmp_path: Path) -> None:
    from llmquant.card import MEASURED_START, read_front_matter

    out = tmp_path / "w4"
    quantize(tiny_llama, out, {"bits": 4, "group_size": 64})
    before = (out / "README.md").read_text()
    argv = ["eval", str(out), "--baseline", str(tiny_llama), "--speed", "--runs", "1", "--prompt-tokens", "8",
            "--new-tokens", "2", "-o", str(tmp_path / "r.json"), "--update-card"]
    assert main(argv) == 0
    report = load_report(tmp_path / "r.json")
    assert plot_panels([report]) == ["prefill", "decode", "memory"]
    card = (out / "README.md").read_text()
    decode = report["models"][1]["speed"][0]["decode_tokens_per_s"]
    assert card != before and f"{decode:.2f}" in card.split(MEASURED_START)[1]
    assert read_front_matter(out / "README.md")["base_model"] == tiny_llama.name
    assert main(argv) == 0  # a second update replaces the section instead of adding one
    assert (out / "README.md").read_text().count("| model |") == 1


def test_update_card_refuses_a_folder_llmquant_did_not_write(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_llama), "--speed", "--runs", "1", "--update-card"]) == 1
    assert "--update-card" in capsys.readouterr().err
