"""Executors: the same output bytes whoever quantizes the blocks, local threads or a Ray cluster."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

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
def ray_cluster() -> Iterator[str]:
    """A Ray head and two worker nodes of one CPU each, on this machine."""
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 would write a token under the home folder
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        import ray

        ray.shutdown()
        for node in nodes:
            cluster.remove_node(node)
        cluster.shutdown()


@pytest.mark.parametrize("algo", ["rtn", "nf4"])
def test_ray_writes_the_same_bytes_as_the_local_executor(model: Path, tmp_path: Path, ray_cluster: str, algo: str) -> None:
    settings = {"algo": algo, "max_shard_size": "200KB", **({"group_size": 32} if algo == "rtn" else {})}
    quantize(model, tmp_path / "local", settings)
    for workers in (1, 2):
        quantize(model, tmp_path / f"ray{workers}", {**settings, "executor": "ray", "ray_address": ray_cluster, "workers": workers})
        assert file_hashes(tmp_path / f"ray{workers}") == file_hashes(tmp_path / "local")


def test_a_bad_ray_address_is_a_one_line_error(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with pytest.raises(LlmquantError, match="cannot connect to Ray") as caught:
        quantize(model, tmp_path / "out", {"executor": "ray", "ray_address": f"127.0.0.1:{free_port()}"})
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_ray_calibrates_gptq_to_the_same_bytes_with_one_and_two_workers(model: Path, tmp_path: Path, ray_cluster: str) -> None:
    """The Hessians are the same per-batch sums added in batch order, wherever the batches were."""
    settings = {"algo": "gptq", "group_size": 32, "calib": str(calibration_file(tmp_path)), "calib_samples": 16,
                "calib_seqlen": 32, "calib_batch_size": 4}
    quantize(model, tmp_path / "local", settings)
    for workers in (1, 2):
        quantize(model, tmp_path / f"ray{workers}", {**settings, "executor": "ray", "ray_address": ray_cluster, "workers": workers})
        assert file_hashes(tmp_path / f"ray{workers}") == file_hashes(tmp_path / "local")
