"""`llmquant verify`: a parity table per real loader, and a non-zero exit when one disagrees or refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmquant.api import quantize
from llmquant.cli import main
from llmquant.plugins import Plugins
from llmquant.verify import MAX_KL, MIN_TOP2, _compare, position_kl

pytestmark = pytest.mark.slow


def test_transformers_loader_agrees(tiny_llama: Path, tmp_path: Path, pm: Plugins, capsys: pytest.CaptureFixture[str]) -> None:
    quantize(tiny_llama, tmp_path / "out", {"bits": 4, "group_size": 64}, plugins=pm)
    assert main(["verify", str(tmp_path / "out"), "--loader", "transformers", "--json"]) == 0
    out = capsys.readouterr().out
    (check,) = json.loads(out[out.index("[\n"):])
    assert check["status"] == "ok" and check["kl_mean"] < 1e-4 and check["top1_in_top2"] == 1.0 and check["positions"] > 30


def test_a_loader_that_refuses_fails_the_command(tiny_llama: Path, tmp_path: Path, pm: Plugins,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    quantize(tiny_llama, out, {"bits": 4, "group_size": 64}, plugins=pm)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["bits"] = 5  # llmquant reads bits from the tensors; transformers refuses
    (out / "config.json").write_text(json.dumps(config))
    assert main(["verify", str(out), "--loader", "transformers"]) == 2
    table = capsys.readouterr().out
    assert "transformers" in table and "refused" in table


def test_vllm_without_an_environment_is_reported_not_failed(tiny_llama: Path, tmp_path: Path, pm: Plugins,
                                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LLMQUANT_VLLM_PYTHON", raising=False)
    quantize(tiny_llama, tmp_path / "out", {"bits": 4, "group_size": 64}, plugins=pm)
    assert main(["verify", str(tmp_path / "out"), "--loader", "vllm"]) == 0
    assert "not installed" in capsys.readouterr().out


def _position(tokens: list[int], logprobs: list[float], actual: float) -> dict[str, Any]:
    return {"logprob": actual, "top1": tokens[0], "top": [[t, lp] for t, lp in zip(tokens, logprobs)]}


NEAR_TIE = _position([5, 8, 2, 9], [-0.80, -0.82, -2.5, -4.0], -0.80)
FLIPPED = _position([8, 5, 2, 9], [-0.80, -0.81, -2.5, -4.0], -0.81)
CONFIDENT = _position([3, 4, 6, 7], [-0.05, -3.5, -5.0, -6.0], -0.05)


def test_a_flipped_near_tie_is_information_not_a_failure() -> None:
    reference = [[NEAR_TIE, CONFIDENT]] * 20 + [[CONFIDENT, CONFIDENT]] * 30
    theirs = [[FLIPPED, CONFIDENT]] * 20 + [[CONFIDENT, CONFIDENT]] * 30
    check = _compare("x", reference, theirs, max_kl=MAX_KL, min_top2=MIN_TOP2)
    assert check.status == "ok" and check.top1_agreement == pytest.approx(0.8) and check.top1_in_top2 == 1.0
    assert check.kl_mean < 1e-3 and check.max_abs_delta_logprob == pytest.approx(0.01)


def test_a_moved_distribution_fails_on_kl_and_top2() -> None:
    wrong = _position([9, 1, 0, 11], [-0.1, -3.0, -4.0, -5.0], -6.0)
    reference, theirs = [[NEAR_TIE, CONFIDENT]] * 50, [[wrong, CONFIDENT]] * 50
    check = _compare("x", reference, theirs, max_kl=MAX_KL, min_top2=MIN_TOP2)
    assert check.status == "disagrees" and check.kl_mean > 1 and check.top1_in_top2 == 0.5
    assert "mean KL" in check.message and "top 2" in check.message


def test_position_kl_is_zero_for_equal_distributions_and_grows_with_the_gap() -> None:
    same = position_kl(NEAR_TIE["top"], NEAR_TIE["top"])
    small = position_kl(NEAR_TIE["top"], FLIPPED["top"])
    large = position_kl(NEAR_TIE["top"], CONFIDENT["top"])
    assert same == pytest.approx(0.0, abs=1e-12) and 0 < small < MAX_KL < 1 < large


def test_a_vllm_error_from_the_machine_leads_with_the_machine_limit() -> None:
    from llmquant.vllm_probe import explain

    error = "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    said = explain(error)
    assert said.startswith("vLLM's CPU build has no int4") and "AVX-512" in said and said.endswith(f"(vLLM said: {error})")
    assert explain("ValueError: unknown quantization method") == "ValueError: unknown quantization method"
