"""Nothing lost: a run killed at any point leaves no finished-looking folder at the target, and
--resume continues it to output byte-identical to an uninterrupted run."""

from __future__ import annotations

import errno
import json
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import calibration_file, dir_hash
from llmquant.api import quantize
from llmquant.errors import LlmquantError
from llmquant.plugins import Plugins


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(source: Path, out: Path, args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMQUANT_KILL_AT"}
    if kill_at:
        env["LLMQUANT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", str(source), "-o", str(out), *args],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("deep") / "m", layers=4)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibration_file(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def references(deep_llama: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """File hashes of an uninterrupted run per algorithm, computed once."""
    found = {}
    for algo in ("rtn", "gptq", "awq-gptaq"):
        out = tmp_path_factory.mktemp("reference") / algo
        done = run_cli(deep_llama, out, settings_args(algo, calib))
        assert done.returncode == 0, done.stderr[-2000:]
        found[algo] = file_hashes(out)
    return found


def settings_args(algo: str, calib: Path) -> list[str]:
    args = ["--algo", algo.replace("awq-gptaq", "gptq"), "--group-size", "64", "--max-shard-size", "300KB"]
    if algo == "awq-gptaq":  # a transform and the float model's activations, resumed too
        args += ["--transform", "awq", "--gptaq", "--param", "awq_grid=4"]
    if algo != "rtn":
        args += ["--calib", str(calib), "--calib-samples", "8", "--calib-seqlen", "32", "--calib-dtype", "float32"]
    return args


@pytest.mark.parametrize("algo,kill_at", [
    ("rtn", "block-0-before-save"), ("rtn", "block-1"), ("rtn", "block-3-written"), ("rtn", "assemble"), ("rtn", "shards-written"), ("rtn", "before-rename"),
    ("gptq", "block-0"), ("gptq", "block-2-before-save"), ("awq-gptaq", "block-1"),
])
def test_killed_run_leaves_no_target_and_resumes_byte_identical(deep_llama: Path, calib: Path, tmp_path: Path,
                                                                   references: dict[str, dict[str, str]], algo: str,
                                                                   kill_at: str) -> None:
    args = settings_args(algo, calib)
    before = dir_hash(deep_llama)

    out = tmp_path / "out"
    killed = run_cli(deep_llama, out, args, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    partial = tmp_path / ".out.llmquant-partial"
    assert partial.exists()

    resumed = run_cli(deep_llama, out, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_hashes(out) == references[algo]
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch folder left beside it
    assert dir_hash(deep_llama) == before


def test_resume_refuses_a_changed_config(deep_llama: Path, calib: Path, tmp_path: Path) -> None:
    args = settings_args("rtn", calib)
    out = tmp_path / "out"
    assert run_cli(deep_llama, out, args, kill_at="block-1").returncode == -9
    changed = run_cli(deep_llama, out, [*args, "--bits", "8", "--resume"])
    assert changed.returncode == 1
    assert "cannot resume from" in changed.stderr and "the config changed" in changed.stderr
    assert not out.exists()


def test_disk_full_keeps_the_partial_folder_for_resume(deep_llama: Path, tmp_path: Path, pm: Plugins,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llmquant.host import resume

    reference = tmp_path / "reference"
    quantize(deep_llama, reference, {"group_size": 64}, plugins=pm)
    real = resume.PartialRun.save_stream  # a run without calibration writes its blocks straight into the shards
    calls = {"n": 0}

    def full_disk(self: Any, index: int, *args: Any) -> None:
        calls["n"] += 1
        if index == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, index, *args)

    monkeypatch.setattr(resume.PartialRun, "save_stream", full_disk)
    out = tmp_path / "out"
    with pytest.raises(LlmquantError, match="no space left on the device .* rerun the same command with --resume"):
        quantize(deep_llama, out, {"group_size": 64}, plugins=pm)
    partial = tmp_path / ".out.llmquant-partial"
    assert not out.exists() and json.loads((partial / "stream.json").read_text())["done"] == 1
    monkeypatch.setattr(resume.PartialRun, "save_stream", real)
    quantize(deep_llama, out, {"group_size": 64}, plugins=pm, resume=True)
    assert file_hashes(out) == file_hashes(reference)
