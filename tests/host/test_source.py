from __future__ import annotations

from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("stored, expected", [("F16", "float16"), ("BF16", "bfloat16"), ("Q8_0", "float16")])
def test_gguf_record_names_the_base_model_and_the_float_dtype(stored: str, expected: str, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from llmquant.host.gguf_import import gguf_record

    path = tmp_path / "Tiny-Model-1B.Q4_K_M.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_organization("SomeOrg")
    writer.add_license("apache-2.0")
    kind = gguf.GGMLQuantizationType[stored]
    if stored == "Q8_0":
        data = gguf.quants.quantize(np.ones((4, 32), dtype=np.float32), kind)
    else:
        data = np.ones((4, 32), dtype=np.float16).view(np.uint8).reshape(4, 64)
    writer.add_tensor("token_embd.weight", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    record = gguf_record(path)
    assert record == {"gguf": str(path.resolve()), "base_model": "SomeOrg/Tiny-Model-1B", "license": "apache-2.0",
                      "float_dtype": expected}


def test_a_gguf_import_writes_float_tensors_in_its_16_bit_dtype(tiny_model_factory: Any, tmp_path: Path, pm: Any) -> None:
    """An import holds float32 dequantizations; `--dtype auto` writes its float parts in the record's
    dtype, while an ordinary checkpoint keeps its own dtype."""
    import json

    from safetensors import safe_open

    from llmquant.api import quantize
    from llmquant.host.source import IMPORT_RECORD

    plain = tiny_model_factory()  # saved in float32
    imported = tiny_model_factory()
    (imported / IMPORT_RECORD).write_text(json.dumps({"gguf": "x.gguf", "base_model": "Org/Tiny", "license": None,
                                                       "float_dtype": "float16"}))
    for source, dtype in ((plain, "F32"), (imported, "F16")):
        out = tmp_path / f"{source.name}-out"
        quantize(source, out, {"bits": 4, "group_size": 64}, plugins=pm)
        with safe_open(out / "model.safetensors", "pt") as f:
            assert f.get_slice("model.embed_tokens.weight").get_dtype() == dtype
        assert not (out / IMPORT_RECORD).exists()
    meta = json.loads((tmp_path / f"{imported.name}-out" / "llmquant.json").read_text())
    assert meta["config"]["dtype"] == "float16" and meta["base_model"] == "Org/Tiny"
    assert json.loads((tmp_path / f"{imported.name}-out" / "config.json").read_text())["dtype"] == "float16"
