from __future__ import annotations

from pathlib import Path

import pytest

from llmquant.errors import CheckpointError
from llmquant.host.source import resolve_model


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)could not fetch 'someone/some-model' from the Hugging Face Hub.*offline"):
        resolve_model("someone/some-model")


def test_folder_is_returned_as_is(tiny_llama: Path) -> None:
    assert resolve_model(tiny_llama) == tiny_llama


@pytest.mark.parametrize("name,message", [
    ("weights.bin", "is a file but not a .gguf"),
    ("missing/deeper/path", "does not exist"),
    ("./nothing", "does not exist"),
], ids=["not-gguf", "deep-path", "relative"])
def test_bad_paths_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match=message):
        resolve_model(name)


def test_broken_gguf_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match=r"could not import .*model\.gguf through transformers' GGUF loader"):
        resolve_model(bad)
    assert not list((tmp_path / "cache").rglob("config.json"))
