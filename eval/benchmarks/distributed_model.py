"""Memory per worker and tensor traffic per block of a GPTQ run on Ray (`llmquant.host.distributed`), from shapes.

    python eval/benchmarks/distributed_model.py        # the table of docs/distributed.md

A dense decoder block has four sequential groups: q/k/v, o and gate/up read the hidden size d, down
reads the intermediate size i. With K calibration batches of N tokens in all, W workers, activations
of b bytes and one block of w parameters in the source dtype (s bytes)::

    to the driver, per block     K * 4 * (3 d^2 + i^2)            each batch's x^T x, float32, per group
                                 + sum over Linears (packed + b * out * in)   solved outputs, dequantized weights
    from the driver, per block   4 * (min(W,3) d^2 + d^2 + min(W,2) d^2 + i^2)   statistics to the solving workers
                                 + W * b * w_linear               the dequantized weights to every worker
    one worker                   2 * (N / W) * d * b              its batches' inputs and outputs
                                 + w * (b + s)                    the block (activation dtype, source tensors)
                                 + (K / W) * 4 * i^2              its batches' partial sums of the widest group
                                 + 2 * 4 * i^2 + 4 * 4 * |W|      a solve: the Hessian, GPTQ's copy, the weight
    the driver                   2 * 4 * i^2                      the running sum and one worker's partials
                                 + (K / W) * 4 * i^2

The driver adds one worker's partial sums at a time (workers hold contiguous runs of batches, so
that is batch order). Packed 4-bit outputs: out * in / 2 bytes plus fp16 scales and zeros per group.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if not __package__:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Dense:
    """A dense decoder's block shapes."""

    name: str
    d: int  # hidden size
    i: int  # intermediate size
    kv: int  # output width of k_proj and v_proj
    layers: int

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of q, k, v, o, gate, up, down."""
        d, i, kv = self.d, self.i, self.kv
        return [(d, d), (kv, d), (kv, d), (d, d), (i, d), (i, d), (d, i)]


SHAPES = [Dense("Llama-3-8B", 4096, 14336, 1024, 32), Dense("Llama-3-70B", 8192, 28672, 1024, 80),
          Dense("Llama-3.1-405B", 16384, 53248, 1024, 126)]
MEASURED = {"qwen2.5-coder-1.5b": Dense("Qwen2.5-Coder-1.5B", 1536, 8960, 256, 28), "smollm2": Dense("SmolLM2-135M", 576, 1536, 192, 30)}


def traffic(m: Dense, batches: int, workers: int, b: int = 2, group: int = 128) -> tuple[float, float]:
    """Bytes (to the driver, from the driver) per block."""
    d, i = m.d, m.i
    partials = batches * 4 * (3 * d * d + i * i)
    weights = sum(o * n for o, n in m.linears())
    packed = sum(o * n // 2 + o * (n // group) * 4 for o, n in m.linears())  # codes, fp16 scales and zeros
    stats = 4 * (min(workers, 3) * d * d + d * d + min(workers, 2) * d * d + i * i)
    return partials + packed + b * weights, stats + workers * b * weights


def worker_bytes(m: Dense, tokens: int, batches: int, workers: int, b: int = 2, s: int = 2) -> float:
    d, i = m.d, m.i
    w = sum(o * n for o, n in m.linears())
    widest = max(o * n for o, n in m.linears())
    return 2 * tokens / workers * d * b + w * (b + s) + batches / workers * 4 * i * i + 2 * 4 * i * i + 4 * 4 * widest


def driver_bytes(m: Dense, batches: int, workers: int) -> float:
    return 2 * 4 * m.i * m.i + batches / workers * 4 * m.i * m.i


def table(samples: int = 128, seqlen: int = 2048, batch: int = 8, workers: int = 8) -> list[str]:
    batches, tokens = -(-samples // batch), samples * seqlen
    lines = [f"GPTQ, {samples} x {seqlen} calibration tokens in batches of {batch} windows, {workers} workers, "
             "bfloat16 activations and checkpoint:", "",
             "| model | per worker GB | driver GB (beyond its baseline) | GB to the driver per block | GB from it per block | whole run, GB moved |",
             "|---|---|---|---|---|---|"]
    for m in SHAPES:
        to, back = traffic(m, batches, workers)
        lines.append(f"| {m.name} | {worker_bytes(m, tokens, batches, workers) / 1e9:.1f} | {driver_bytes(m, batches, workers) / 1e9:.1f} | "
                     f"{to / 1e9:.1f} | {back / 1e9:.1f} | {(to + back) * m.layers / 1e9:.0f} |")
    return lines


def check(model: str, results: Path, group: int = 128, batch: int = 8, workers: int = 2) -> str:
    """The formula's bytes per block against a measured Ray run (`bench_executors.py`'s results for `model`)."""
    data = json.loads(results.read_text())
    samples, _ = (int(v) for v in data["setup"]["calibration"].split(" x "))
    measured = data["rows"]["ray-gptq"]["traffic"]
    to, back = (sum(t[k] for t in measured) / len(measured) for k in (1, 2))
    p_to, p_back = traffic(MEASURED[model], -(-samples // batch), workers, group=group)
    return (f"{MEASURED[model].name}, {data['setup']['calibration']} tokens, {workers} workers: predicted {p_to / 1e6:.1f} MB to "
            f"the driver and {p_back / 1e6:.1f} MB from it per block, measured {to:.1f} and {back:.1f} MB.")


if __name__ == "__main__":
    print("\n".join(table()))
    for name in MEASURED:
        path = ROOT / "eval" / "benchmarks" / "results" / f"executors_{name}.json"
        if path.exists() and "ray-gptq" in json.loads(path.read_text())["rows"]:
            print(check(name, path, group=64 if name == "smollm2" else 128))
