from __future__ import annotations

from eval.benchmarks.bench_executors import table
from eval.benchmarks.distributed_model import SHAPES, traffic, worker_bytes


def test_the_table_says_which_ray_rows_wrote_the_local_bytes() -> None:
    setup = {"model": "SmolLM2", "checkpoint_mb": 538.0, "read_mb_s": 1000.0, "calibration": "8 x 256", "cpus": 2}
    row = {"wall_s": 10.0, "driver_peak_mb": 500.0, "traffic": [], "worker_peak_mb": [], "mb_s": 53.8, "vs_read": 0.0538}
    rows = {"local-gptq": {**row, "hash": "a"},
            "ray-gptq": {**row, "hash": "a", "worker_peak_mb": [400.0, 390.0], "traffic": [[0, 3.0, 1.0], [1, 5.0, 3.0]]},
            "ray-rtn": {**row, "hash": "b"}}
    lines = table({"setup": setup, "rows": rows})
    assert "| ray-gptq | 10.0 | 54 (0.05x) | 500 | 400, 390 | 4.0 / 2.0 | yes |" in lines
    assert "| local-gptq | 10.0 | 54 (0.05x) | 500 | - | - | - |" in lines
    assert lines[-1].endswith("| - | ? |")  # no local RTN row to compare with


def test_the_traffic_model_grows_with_batches_and_workers_as_the_driver_loop_does() -> None:
    eight_b = SHAPES[0]
    to_1, back_1 = traffic(eight_b, batches=1, workers=1)
    to_16, back_16 = traffic(eight_b, batches=16, workers=8)
    assert to_16 - to_1 == 15 * 4 * (3 * 4096**2 + 14336**2)  # one float32 x^T x per group per batch
    assert back_16 - back_1 == 4 * (2 * 4096**2 + 4096**2) + 7 * 2 * sum(o * i for o, i in eight_b.linears())
    assert worker_bytes(eight_b, 128 * 2048, 16, 8) < worker_bytes(eight_b, 128 * 2048, 16, 4)
