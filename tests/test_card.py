"""The model card in every output: Hugging Face front matter that parses, numbers equal to the run
record, the commands to load, serve and evaluate, and the CLI's next steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import calibration_file
from llmquant.api import quantize
from llmquant.card import MEASURED_END, MEASURED_START, card_settings, read_front_matter
from llmquant.cli import main
from llmquant.plugins import Plugins

CASES: dict[str, dict[str, Any]] = {
    "rtn-gptq": {"algo": "rtn", "bits": 4, "group_size": 64},
    "gptq-asym-ct": {"algo": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "format": "compressed-tensors",
                     "calib_samples": 4, "calib_seqlen": 32, "seed": 3},
    "nf4-bnb": {"algo": "nf4", "blocksize": 128},
    "rtn-mixed": {"algo": "rtn", "bits": 4, "group_size": 64, "ignore": [r"layers\.0\.self_attn\.q_proj$"],
                  "overrides": [{"pattern": r"mlp\.down_proj$", "bits": 8}]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_card_front_matter_parses_and_matches_the_run_record(case: str, tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    settings = dict(CASES[case])
    if settings["algo"] == "gptq":
        settings["calib"] = str(calibration_file(tmp_path))
    out = tmp_path / case
    quantize(tiny_llama, out, settings, plugins=pm)
    meta = json.loads((out / "llmquant.json").read_text())
    card = (out / "README.md").read_text()
    front = read_front_matter(out / "README.md")
    assert yaml.safe_load(card.split("---\n")[1]) == front
    assert front["quantized_by"] == "llmquant" and front["library_name"] == "transformers"
    assert front["base_model"] == tiny_llama.name == meta["base_model"]
    assert {"llmquant", settings["algo"], meta["config"]["format"], "4-bit"} <= set(front["tags"])
    s = front["llmquant"]
    assert s == card_settings(meta)
    quantized = [m for m in meta["modules"] if m["bits"] is not None]
    assert s["linears_quantized"] == len(quantized) and s["linears_in_float"] == len(meta["modules"]) - len(quantized)
    assert s["format"] == meta["config"]["format"] and s["algorithm"] == meta["config"]["algo"]
    assert s["bits"] == 4 and s["group_size"] == max({m["group_size"] for m in quantized},
                                                      key=[m["group_size"] for m in quantized].count)
    assert s["llmquant_version"] == meta["llmquant_version"]
    assert s["plugins"] == {"algorithm": "llmquant test", "format": "llmquant test"}  # the pm fixture's registration
    body = card.split("---\n", 2)[2]
    assert f"| bits | {s['bits']}" in body and f"| Linears | {s['linears_quantized']} quantized, {s['linears_in_float']} kept" in body
    assert 'load_quantized("model-dir")' in body and "llmquant verify model-dir" in body
    assert case not in card  # the card does not depend on the folder's name, so resumed and moved copies are identical
    assert MEASURED_START in body and MEASURED_END in body


def test_calibration_is_stated_on_the_card(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    calib = calibration_file(tmp_path)
    quantize(tiny_llama, tmp_path / "g", {"algo": "gptq", "bits": 4, "group_size": 64, "calib": str(calib),
                                          "calib_samples": 6, "calib_seqlen": 24, "seed": 5}, plugins=pm)
    front = read_front_matter(tmp_path / "g" / "README.md")
    assert front["llmquant"]["calibration"] == {"data": str(calib), "samples": 6, "seqlen": 24, "seed": 5}
    assert f"`{calib}`: 6 samples of 24 tokens, seed 5" in (tmp_path / "g" / "README.md").read_text()
    quantize(tiny_llama, tmp_path / "r", {"bits": 4, "group_size": 64}, plugins=pm)
    assert read_front_matter(tmp_path / "r" / "README.md")["llmquant"]["calibration"] is None


def test_the_sources_own_readme_is_not_copied_over_the_card(tiny_model_factory: Any, tmp_path: Path, pm: Plugins) -> None:
    source = tiny_model_factory()
    (source / "README.md").write_text("---\nlicense: mit\n---\n# the original model\n")
    quantize(source, tmp_path / "out", {"bits": 4, "group_size": 64}, plugins=pm)
    assert "quantized_by: llmquant" in (tmp_path / "out" / "README.md").read_text()
    assert (source / "README.md").read_text().startswith("---\nlicense: mit")


def test_quantize_prints_the_next_commands(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--bits", "4", "--group-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"llmquant eval {out} --baseline {tiny_llama}" in printed and "--update-card" in printed
    assert f"llmquant verify {out}" in printed and f"vllm serve {out}" in printed
