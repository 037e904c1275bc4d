"""Rotation of the residual stream (QuaRot, arXiv:2404.00456): an orthogonal ``Q`` folded into
the embedding, every Linear that reads or writes the residual stream, and the head.

The norms' weights are folded into the Linears that read them first (so that every norm
multiplies by one, and ``RMSNorm(x Q) = RMSNorm(x) Q``); then readers become ``W Q`` and
writers ``Q^T W``. The model is the same architecture with new weights: every server loads it
unchanged. Outlier channels of the residual stream are spread over all channels, so weights
that read it quantize with smaller groups' ranges. ``Q`` is a Hadamard matrix with random
signs, of any size ``2^k * m`` where a Paley construction gives ``m`` (576 = 16 * 36,
640 = 32 * 20, 1536 = 128 * 12); a random orthogonal matrix otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.errors import ConfigError, LlmquantError
from llmquant.transform import BlockContext, ModelContext, ModelEdit, Transform

__all__ = ["Rotate", "RotateConfig", "hadamard", "rotation_matrix"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RotateConfig:
    """Settings of ``--transform rotate``.

    Attributes:
        rotate_kind: "hadamard" (a Hadamard matrix with random signs; a random orthogonal matrix
            when none of the residual width is constructible) or "random" (random orthogonal).
        rotate_seed: seed of the signs (or of the random matrix).
    """

    rotate_kind: Literal["hadamard", "random"] = "hadamard"
    rotate_seed: int = 0

    def __post_init__(self) -> None:
        if self.rotate_seed < 0:
            raise ConfigError("rotate_seed", self.rotate_seed, "a non-negative int")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = legendre(j - i, q)``: the core of Paley's constructions."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley(m: int) -> Tensor | None:
    """A Hadamard matrix of order m from Paley's first (q = m - 1 = 3 mod 4) or second
    (q = m / 2 - 1 = 1 mod 4) construction, q prime; None when neither applies."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return S + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        other = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(torch.eye(q + 1, dtype=torch.float64), one) + torch.kron(C, other)
    return None


def hadamard(n: int) -> Tensor | None:
    """A Hadamard matrix ``H: (n, n)`` of +-1 (``H H^T = n I``), float64, as Paley's ``m``
    doubled by Sylvester's construction; None when no such ``n = 2^k * m`` is found."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for doublings in range(k, -1, -1):  # the smallest Paley order first
        base = _paley(n >> doublings)
        if base is not None:
            H = base
            for _ in range(doublings):
                H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
            return H
    return None


def rotation_matrix(n: int, kind: str, seed: int) -> Tensor:
    """An orthogonal ``Q: (n, n)``, float32: a Hadamard matrix with random column signs, scaled
    by ``1/sqrt(n)``, or a random orthogonal matrix."""
    generator = torch.Generator().manual_seed(seed)
    H = hadamard(n) if kind == "hadamard" else None
    if H is None:
        if kind == "hadamard":
            log.warning("rotate: no Hadamard matrix of order %d is known here; using a random orthogonal matrix", n)
        Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        orthogonal: Tensor = (Q * torch.sign(torch.diagonal(R))[None, :]).float()
        return orthogonal
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return (H * signs[None, :] / math.sqrt(n)).float()


class Rotate:
    """Fold the norms and rotate the residual stream by a random Hadamard matrix."""

    name: ClassVar[str] = "rotate"
    description: ClassVar[str] = "rotate the residual stream by a random Hadamard matrix (QuaRot); no calibration"
    config_type: ClassVar[type[RotateConfig]] = RotateConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self) -> None:
        self.Q: Tensor | None = None

    def prepare(self, model: ModelContext, config: RotateConfig) -> ModelEdit:
        if model.final_norm is None:
            raise LlmquantError(f"rotate: no final norm of width {model.hidden_size} found before the head of this "
                                f"{model.model_type} model; rotation needs an RMSNorm there")
        Q = rotation_matrix(model.hidden_size, config.rotate_kind, config.rotate_seed)
        self.Q = Q
        gamma = model.read(model.final_norm) + model.final_norm_offset
        offset = model.final_norm_offset
        tensors: dict[str, Callable[[Tensor], Tensor]] = {
            model.embedding: lambda E: E @ Q,
            model.head: lambda W: (W * gamma[None, :]) @ Q,
            model.final_norm: lambda w: torch.full_like(w, 1.0 - offset),
        }
        return ModelEdit(rotation=Q, tensors=tensors, untie=model.tied)

    def transform_block(self, block: BlockContext, config: RotateConfig) -> None:
        assert self.Q is not None, "prepare runs before the first block"
        if block.post_norms:
            raise LlmquantError(
                f"rotate: {block.name}.{block.post_norms[0]} normalizes a Linear's output before it joins the residual "
                f"stream (Gemma-style post-norms), which a rotation cannot pass through; use --transform awq for this model")
        weights, Q = block.weights, self.Q.to(next(iter(block.weights.values())).device)
        folded = [p for p in block.scale_points if p.kind == "norm" and set(p.readers) <= set(block.residual_readers)]
        for point in folded:
            if f"{point.producer}.bias" in weights:
                raise LlmquantError(f"rotate: {block.name}.{point.producer} has a bias (a LayerNorm, not an RMSNorm); "
                                    f"rotation needs RMSNorm, use --transform awq for this model")
            gamma = weights[f"{point.producer}.weight"] + point.offset
            for reader in point.readers:
                weights[f"{reader}.weight"] = weights[f"{reader}.weight"] * gamma[None, :]
            weights[f"{point.producer}.weight"] = torch.full_like(gamma, 1.0 - point.offset)
        for reader in block.residual_readers:
            weights[f"{reader}.weight"] = weights[f"{reader}.weight"] @ Q
        for writer in block.residual_writers:
            weights[f"{writer}.weight"] = Q.T @ weights[f"{writer}.weight"]
            if f"{writer}.bias" in weights:
                weights[f"{writer}.bias"] = weights[f"{writer}.bias"] @ Q


@hookimpl
def llmquant_register_transforms(register: Callable[[type[Transform]], None]) -> None:
    register(Rotate)
