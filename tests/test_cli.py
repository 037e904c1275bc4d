from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quantize_then_inspect(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_llama), "-o", str(out), "--config", str(CONFIGS / "w4-g64-rtn-down8.toml"), "--asym"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "14 weight matrices quantized (rtn), 0 kept in float;" in summary and "smaller" in summary
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    modules = {m["name"]: m for m in info["modules"]}
    assert modules["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert modules["model.layers.0.mlp.up_proj"]["bits"] == 4 and modules["model.layers.0.mlp.up_proj"]["symmetric"] is False
    assert modules["model.layers.0.mlp.up_proj"]["bytes"] < modules["model.layers.0.mlp.up_proj"]["bytes_fp16"] / 3
    assert info["config"]["symmetric"] is False and info["quantization_config"]["quant_method"] == "gptq"
    assert main(["inspect", str(out)]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out


def test_param_flag_and_per_channel(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--per-channel", "--param", "bits=8"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (8, -1)


@pytest.mark.parametrize("argv,message", [
    (["--algo", "nope"], "unknown algorithm 'nope': installed algorithms are gptq, groupwise-int4, nf4, rtn"),
    (["--bits", "7"], "flags: bits: expected one of 2, 3, 4, 5, 6, 8, got 7"),
    (["--group-size", "96"], "not a multiple of group_size 96"),
    (["--format", "exl9"], "unknown format 'exl9': available formats are bitsandbytes, compressed-tensors, gguf, gptq, gptq_v2"),
    (["--algo", "nf4", "--format", "gptq"], "format 'gptq' cannot store CodebookQuantized results of algorithm 'nf4'; use one of: bitsandbytes"),
    (["--algo", "rtn", "--format", "bitsandbytes"], "use one of: compressed-tensors, gguf, gptq, gptq_v2"),
    (["--format", "compressed-tensors", "--bits", "3"], "compressed-tensors pack-quantized stores 2, 4, 8-bit integers, not 3-bit"),
    (["--param", "dampening=0.1"], "dampening: expected a known key"),
    (["--workers", "0"], "flags: workers: expected at least 1, got 0"),
    (["--executor", "ray", "--ray-address", "localhost"], "give HOST:PORT"),
], ids=["algo", "bits", "group", "format", "codebook-to-gptq", "uniform-to-bnb", "ct-3bit", "param", "workers", "ray-address"])
def test_bad_input_is_one_line_and_exit_1(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    assert main(["quantize", str(tiny_llama), "-o", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmquant: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_plugins_prints_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "rtn", "distribution": "llmquant", "version": rows[0]["version"],
            "hooks": ["llmquant_register_algorithms"]} in rows


def test_algorithms_lists_rtn(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["algorithms"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("rtn"))
    assert "llmquant" in line and "round-to-nearest" in line


def test_gptq_flags(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import calibration_file

    out = tmp_path / "out"
    calib = calibration_file(tmp_path)
    code = main(["quantize", str(tiny_llama), "-o", str(out), "--algo", "gptq", "--group-size", "64", "--calib", str(calib),
                 "--calib-samples", "8", "--calib-seqlen", "32", "--calib-batch-size", "3", "--desc-act",
                 "--damp-percent", "0.05", "--calib-dtype", "float32", "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["desc_act"], config["damp_percent"]) == (True, 0.05)
    recorded = json.loads((out / "llmquant.json").read_text())["config"]
    assert (recorded["calib_samples"], recorded["seed"], recorded["calib_dtype"]) == (8, 3, "float32")


def test_gptq_without_calib_flag_is_one_line(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(tiny_llama), "-o", str(tmp_path / "out"), "--algo", "gptq"]) == 1
    assert "pass --calib SOURCE" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "CUDA is not available here"), ("gpu7", "is not a device")], ids=["cuda", "bogus"])
def test_unavailable_device_is_one_line(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, message: str) -> None:
    assert main(["quantize", str(tiny_llama), "-o", str(tmp_path / "out"), "--device", device, "--group-size", "64"]) == 1
    assert message in capsys.readouterr().err


QUIET_PROBE = """
import logging, warnings
from llmquant.cli import _configure_output
_configure_output({verbose})
warnings.warn_explicit("a third-party deprecation", DeprecationWarning, "lib.py", 1, module="somelib")
warnings.warn_explicit("llmquant's own warning", UserWarning, "x.py", 1, module="llmquant.host.runner")
logging.getLogger("somelib").warning("a third-party log warning")
logging.getLogger("somelib").error("a third-party error")
logging.getLogger("llmquant.host.runner").info("our progress")
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_quiet_by_default_and_everything_with_v(verbose: bool) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "default", "-c", QUIET_PROBE.format(verbose=verbose)],
                          capture_output=True, text=True, check=True)
    for shown in ("llmquant's own warning", "a third-party error", "our progress"):
        assert shown in done.stderr
    for hidden in ("a third-party deprecation", "a third-party log warning"):
        assert (hidden in done.stderr) is verbose, done.stderr


def test_transforms_from_toml_and_flags(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import calibration_file

    config = tmp_path / "rotate.toml"
    config.write_text('transforms = ["rotate"]\nrotate_seed = 3\nbits = 4\ngroup_size = 64\n')
    assert main(["quantize", str(tiny_llama), "-o", str(tmp_path / "a"), "--config", str(config)]) == 0
    record = json.loads((tmp_path / "a" / "llmquant.json").read_text())["config"]
    assert record["transforms"] == ["rotate"] and record["rotate_seed"] == 3
    calib = ["--calib", str(calibration_file(tmp_path)), "--calib-samples", "8", "--calib-seqlen", "32"]
    argv = ["quantize", str(tiny_llama), "-o", str(tmp_path / "b"), "--config", str(config), "--transform", "awq",
            "--transform", "rotate", "--param", "awq_grid=4", *calib]
    assert main(argv) == 0  # flags replace the file's list; the file's rotate_seed still applies
    record = json.loads((tmp_path / "b" / "llmquant.json").read_text())["config"]
    assert record["transforms"] == ["awq", "rotate"] and record["awq_grid"] == 4 and record["rotate_seed"] == 3
    config.write_text('transforms = ["awq"]\nawq_grd = 4\n')
    assert main(["quantize", str(tiny_llama), "-o", str(tmp_path / "c"), "--config", str(config), *calib]) == 1
    assert "awq_grd" in capsys.readouterr().err
    assert main(["transforms"]) == 0
    listed = capsys.readouterr().out
    assert "awq" in listed and "rotate" in listed
