from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llmquant.errors import ConfigError, LlmquantError
from llmquant.host.calibration_data import CalibrationConfig, load_calibration, read_texts

DOCS = [f"t{i} t{i + 1} t{i + 2} t{i + 3}" for i in range(3, 60)]


def write_sources(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.txt").write_text("\n".join(DOCS) + "\n")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (folder / "records.json").write_text(json.dumps({f"title {i}": {"title": f"title {i}", "extract": d} for i, d in enumerate(DOCS)}))
    (folder / "list.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    import datasets

    datasets.Dataset.from_list([{"content": d} for d in DOCS]).to_parquet(str(folder / "docs.parquet"))
    shards = folder / "shards"
    shards.mkdir(exist_ok=True)
    for i in range(3):
        (shards / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[i::3]))
    return {p.name: p for p in [*folder.iterdir()]}


@pytest.mark.parametrize("name,column", [("docs.txt", None), ("docs.jsonl", None), ("records.json", None),
                                         ("list.json", "body"), ("docs.parquet", None), ("shards", None)])
def test_every_kind_of_source_reads_the_documents(tmp_path: Path, name: str, column: str | None) -> None:
    sources = write_sources(tmp_path / "src")
    texts = read_texts(CalibrationConfig(calib=str(sources[name]), calib_column=column))
    assert sorted(texts) == sorted(DOCS)


def test_windows_are_deterministic_under_the_seed(tiny_llama: Path, tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = CalibrationConfig(calib=str(sources["docs.txt"]), calib_samples=4, calib_seqlen=16, seed=1)
    a, b = load_calibration(config, tokenizer), load_calibration(config, tokenizer)
    other = load_calibration(CalibrationConfig(calib=str(sources["docs.txt"]), calib_samples=4, calib_seqlen=16, seed=2), tokenizer)
    assert a.shape == (4, 16) and a.dtype == torch.int64 and torch.equal(a, b) and not torch.equal(a, other)
    assert (a == tokenizer.eos_token_id).sum() > 0  # documents are joined with EOS


def test_chat_template_wraps_documents(tiny_llama: Path, tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    config = CalibrationConfig(calib=str(sources["docs.txt"]), calib_samples=2, calib_seqlen=16, calib_chat_template=True)
    ids = load_calibration(config, tokenizer)
    assert (ids == tokenizer.bos_token_id).sum() >= 2


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src")
    with pytest.raises(LlmquantError, match=r"no text column 'nope'; columns are \['text', 'id'\]"):
        read_texts(CalibrationConfig(calib=str(sources["docs.jsonl"]), calib_column="nope"))


def test_unknown_dataset_offline_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmquantError, match="could not open calibration dataset 'someone/corpus'"):
        read_texts(CalibrationConfig(calib="someone/corpus"))


def test_mixed_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("t3 t4\n")
    (tmp_path / "b.jsonl").write_text('{"text": "t5"}\n')
    with pytest.raises(LlmquantError, match=r"found \['.jsonl', '.txt'\]"):
        read_texts(CalibrationConfig(calib=str(tmp_path)))


@pytest.mark.parametrize("kwargs,field", [({"calib_samples": 0}, "calib_samples"), ({"calib_dtype": "int8"}, "calib_dtype"),
                                          ({"calib_memory": "lots"}, "calib_memory")], ids=["samples", "dtype", "memory"])
def test_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        CalibrationConfig(**kwargs)


def test_empty_calibration_text_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LlmquantError, match=r"has 0 tokens, fewer than the 512"):
        load_calibration(CalibrationConfig(calib=str(empty), calib_samples=1, calib_seqlen=512), AutoTokenizer.from_pretrained(tiny_llama))
