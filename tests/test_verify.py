"""`llmquant verify`: a parity table per real loader, and a non-zero exit when one disagrees or refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmquant.api import quantize
from llmquant.cli import main
from llmquant.plugins import Plugins
from llmquant.verify import _compare

pytestmark = pytest.mark.slow


def test_transformers_loader_agrees(tiny_llama: Path, tmp_path: Path, pm: Plugins, capsys: pytest.CaptureFixture[str]) -> None:
    quantize(tiny_llama, tmp_path / "out", {"bits": 4, "group_size": 64}, plugins=pm)
    assert main(["verify", str(tmp_path / "out"), "--loader", "transformers", "--json"]) == 0
    out = capsys.readouterr().out
    (check,) = json.loads(out[out.index("[\n"):])
    assert check["status"] == "ok" and check["top1_agreement"] >= 0.99 and check["positions"] > 30


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


def test_disagreement_is_measured_per_position() -> None:
    reference = [[{"logprob": -1.0, "top1": 5}, {"logprob": -2.0, "top1": 7}]] * 50
    theirs = [[{"logprob": -1.1, "top1": 5}, {"logprob": -2.5, "top1": 8}]] * 50
    check = _compare("x", reference, theirs, 0.99)
    assert check.status == "disagrees" and check.top1_agreement == 0.5 and check.max_abs_delta_logprob == pytest.approx(0.5)
    assert _compare("x", reference, reference, 0.99).status == "ok"
