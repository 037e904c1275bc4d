"""Executors: the same output bytes whoever quantizes the blocks, local threads or a Ray cluster."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import calibration_file, free_port, save_tiny_model
from llmquant.api import quantize
from llmquant.errors import ConfigError, LlmquantError


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("executor") / "m", layers=4)


@pytest.mark.parametrize("algo", ["rtn", "nf4"])
def test_local_threads_write_the_same_bytes_as_one_worker(model: Path, tmp_path: Path, algo: str) -> None:
    settings = {"algo": algo, "max_shard_size": "200KB", **({"group_size": 32} if algo == "rtn" else {})}
    quantize(model, tmp_path / "one", {**settings, "workers": 1})
    quantize(model, tmp_path / "four", {**settings, "workers": 4})
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "four")
    assert len(file_hashes(tmp_path / "one")) > 4  # several shards: the order blocks were written in matters


def test_bad_executor_settings_are_one_line_errors(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workers"):
        quantize(model, tmp_path / "a", {"workers": 0})
    with pytest.raises(ConfigError, match="executor"):
        quantize(model, tmp_path / "b", {"executor": "dask"})
    with pytest.raises(LlmquantError, match="--ray-address needs --executor ray"):
        quantize(model, tmp_path / "c", {"ray_address": "127.0.0.1:1"})


def test_calibrated_runs_do_not_depend_on_the_number_of_local_workers(model: Path, tmp_path: Path) -> None:
    settings = {"algo": "gptq", "group_size": 32, "calib": str(calibration_file(tmp_path)), "calib_samples": 16,
                "calib_seqlen": 32, "calib_batch_size": 4}
    quantize(model, tmp_path / "one", {**settings, "workers": 1})
    quantize(model, tmp_path / "two", {**settings, "workers": 2})
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A Ray head (no CPUs: it only schedules) and two worker nodes of one CPU each, on this machine."""
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 would write a token under the home folder
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        cluster.shutdown()


@pytest.mark.parametrize("algo", ["rtn", "nf4"])
def test_ray_writes_the_same_bytes_as_the_local_executor(model: Path, tmp_path: Path, ray_cluster: Any, algo: str) -> None:
    settings = {"algo": algo, "max_shard_size": "200KB", **({"group_size": 32} if algo == "rtn" else {})}
    quantize(model, tmp_path / "local", settings)
    for workers in (1, 2):
        quantize(model, tmp_path / f"ray{workers}", {**settings, "executor": "ray", "ray_address": ray_cluster.address, "workers": workers})
        assert file_hashes(tmp_path / f"ray{workers}") == file_hashes(tmp_path / "local")


def test_a_bad_ray_address_is_a_one_line_error(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with pytest.raises(LlmquantError, match="cannot connect to Ray") as caught:
        quantize(model, tmp_path / "out", {"executor": "ray", "ray_address": f"127.0.0.1:{free_port()}"})
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_ray_calibrates_gptq_to_the_same_bytes_with_one_and_two_workers(model: Path, tmp_path: Path, ray_cluster: Any,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The Hessians are the same per-batch sums added in batch order, wherever the batches were; what each block
    moves is logged: at least every batch's partial sums to the driver and the weights to every worker."""
    settings = {"algo": "gptq", "group_size": 32, "calib": str(calibration_file(tmp_path)), "calib_samples": 16,
                "calib_seqlen": 32, "calib_batch_size": 4}
    quantize(model, tmp_path / "local", settings)
    for workers in (1, 2):
        with caplog.at_level(logging.INFO, logger="llmquant.host.distributed"):
            quantize(model, tmp_path / f"ray{workers}", {**settings, "executor": "ray", "ray_address": ray_cluster.address,
                                                         "workers": workers})
        assert file_hashes(tmp_path / f"ray{workers}") == file_hashes(tmp_path / "local")
    moved = re.search(r"block 0 over 2 workers: ([\d.]+) MB of tensors to the driver, ([\d.]+) MB from it", caplog.text)
    assert moved is not None, caplog.text[-2000:]
    partials = 4 * 4 * (3 * 128**2 + 256**2)  # 4 batches' x^T x, float32: q/k/v, o and gate/up read 128 wide, down 256
    weights = 2 * (128 * 128 * 2 + 64 * 128 * 2 + 256 * 128 * 3)  # the block's dequantized weights, at least 2 bytes each
    assert float(moved[1]) * 1e6 >= partials and float(moved[2]) * 1e6 >= 2 * weights


GPTQ = {"algo": "gptq", "group_size": 32, "calib_samples": 16, "calib_seqlen": 32, "calib_batch_size": 4}


def test_a_lost_worker_node_is_replaced_and_the_output_is_unchanged(model: Path, tmp_path: Path, ray_cluster: Any,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A node removed while a GPTQ run is at block 2: its worker is lost, a replacement starts on the spare node, every
    worker reloads block 2's inputs from the files they saved, and the block is redone, to the same bytes."""
    from llmquant.host import distributed

    settings = {**GPTQ, "calib": str(calibration_file(tmp_path))}
    quantize(model, tmp_path / "local", settings)
    real, spare = distributed.calibrated_block, []

    def losing_a_node(workers: list[Any], get: Any, index: int, *rest: Any) -> None:
        if index == 2 and not spare:
            ray_cluster.remove_node(next(iter(ray_cluster.worker_nodes)))  # each node runs one of the two workers
            spare.append(ray_cluster.add_node(num_cpus=1))  # what a cluster's autoscaler would bring
        real(workers, get, index, *rest)

    monkeypatch.setattr(distributed, "calibrated_block", losing_a_node)
    with caplog.at_level(logging.WARNING, logger="llmquant.host.distributed"):
        quantize(model, tmp_path / "ray", {**settings, "executor": "ray", "ray_address": ray_cluster.address, "workers": 2})
    assert spare and "block 2: a calibration worker was lost" in caplog.text
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")


def test_a_killed_ray_gptq_run_resumes_with_other_workers_to_the_same_bytes(model: Path, tmp_path: Path, ray_cluster: Any) -> None:
    """The driver killed after block 1 of a 2-worker run; `--resume` with one worker takes block 2's inputs from the
    per-batch files the workers saved."""
    calib = calibration_file(tmp_path)
    quantize(model, tmp_path / "local", {**GPTQ, "calib": str(calib)})
    out = tmp_path / "ray"
    args = ["--algo", "gptq", "--group-size", "32", "--calib", str(calib), "--calib-samples", "16", "--calib-seqlen", "32",
            "--calib-batch-size", "4", "--executor", "ray", "--ray-address", ray_cluster.address]

    def cli(*extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LLMQUANT_KILL_AT"} | ({"LLMQUANT_KILL_AT": kill_at} if kill_at else {})
        return subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", str(model), "-o", str(out), *args, *extra],
                              capture_output=True, text=True, env=env)

    killed = cli("--workers", "2", kill_at="block-1")
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = next(tmp_path.glob(".ray*partial"))
    assert sorted(p.name for p in (partial / "batches").iterdir()) == ["inputs-00002"]  # block 2's, the only ones kept
    resumed = cli("--workers", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_hashes(out) == file_hashes(tmp_path / "local")


def test_solves_are_spread_over_workers_by_cost_largest_first() -> None:
    from llmquant.host.distributed import by_cost

    costs = {"q": 1.0, "k": 0.25, "v": 0.25, "up": 3.0, "gate": 3.0, "o": 1.0}
    assert by_cost(list(costs), costs.__getitem__, 2) == [["up", "q", "k"], ["gate", "o", "v"]]
    assert by_cost(["q"], costs.__getitem__, 3) == [["q"], [], []]
    assert by_cost(list(costs), costs.__getitem__, 1) == [["up", "gate", "q", "o", "k", "v"]]


@pytest.mark.parametrize(("arch", "policy"), [("mixtral", "routed"), ("qwen2_moe", "all")])
def test_ray_calibrates_routed_experts_to_the_same_bytes(tmp_path: Path, ray_cluster: Any, arch: str, policy: str) -> None:
    """Each expert's Hessian from the batches' routed tokens, added in batch order; the experts' solves spread over the
    workers; experts below the token floor fall back the same way."""
    from conftest import save_tiny_moe

    source = save_tiny_moe(tmp_path / "model", arch)
    settings = {**GPTQ, "calib": str(calibration_file(tmp_path)), "moe_calibration": policy, "moe_min_tokens": 0.25}
    local = quantize(source, tmp_path / "local", settings)
    quantize(source, tmp_path / "ray", {**settings, "executor": "ray", "ray_address": ray_cluster.address, "workers": 2})
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")
    if policy == "routed":
        fallbacks = [r.name for r in local.modules if "fallback" in str(r.extra.get("calibration", ""))]
        assert 0 < len(fallbacks) < 2 * 8 * 3, fallbacks  # some experts fell under the floor, not all


def test_tensor_bytes_counts_what_a_call_moves() -> None:
    import torch

    from llmquant.algorithm import CalibrationStats
    from llmquant.host.distributed import tensor_bytes

    stats = CalibrationStats(H=torch.zeros(8, 8), nsamples=3)
    assert tensor_bytes([("q", stats), {"w": torch.zeros(4, 2, dtype=torch.float16)}, 7, "x"]) == 8 * 8 * 4 + 4 * 2 * 2
