"""GPTQ: quantize one column at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's input.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323, Algorithm 1 (lazy batch updates over the upper Cholesky factor
of ``H^-1``). Names follow the paper and the reference implementation (IST-DASLab/gptq):
``W`` (out, in) weight, ``H`` (in, in) Hessian ``2 X X^T / n``, ``Hinv`` Cholesky factor of its
inverse, ``Q`` quantized weight, ``Err`` scaled errors of one lazy batch.

Column orders:

* natural: columns in index order, group parameters fitted when a group starts.
* ``desc_act``: columns by decreasing ``diag(H)`` (act-order); groups are formed in that order,
  so ``g_idx`` is a permutation-derived assignment.
* ``desc_act`` + ``static_groups``: act-order processing with group parameters fitted on the
  original weight before any update; ``g_idx`` stays ``i // group_size`` (fast kernels need it).
* ``act_group_aware`` (default): groups are visited by decreasing importance (their largest
  ``diag(H)``) and, inside each group, columns by decreasing ``diag(H)``. Group parameters are
  fitted on the updated weight when the group starts and ``g_idx`` stays trivial: most of
  act-order's gain at no cost to the kernels (GPTQModel's "GAR" ordering does the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import Algorithm, CalibrationStats, UniformQuantized
from llmquant.errors import ConfigError, LlmquantError, ShapeError
from llmquant.uniform import (UniformConfig, best_clip, check_groups, grid_scales, minmax_params, minmax_quantize, quantize_to_codes,
                              to_stored_precision)

__all__ = ["GPTQ", "GPTQConfig", "gptq_quantize", "find_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(UniformConfig):
    """GPTQ settings.

    Attributes:
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean.
            Retried at 10x, up to 1.0, if the Cholesky factorization fails.
        desc_act: process columns by decreasing Hessian diagonal (act-order).
        static_groups: with desc_act, fit group parameters before any update, keeping a trivial g_idx.
        act_group_aware: visit whole groups by importance, columns inside by importance; trivial g_idx.
        mse: search each group's clipping ratio for the lowest error; off by default (plain
            min-max, as GPTQModel and llm-compressor do by default).
        mse_weight: how that search weighs each column's squared error: "hessian" (default) by
            ``1 / Hinv[j, j]**2``, what GPTQ's own objective charges for rounding column j
            (Algorithm 1's ``err / d``; the columns its inputs drive hardest count most); "none"
            unweighted, as the reference's ``--mse`` does. How each choice scores on real models
            is in docs/benchmarks.md.
        block_size: columns per lazy batch update.
        gptaq: fit the quantized layer's output on its (quantized-model) inputs to the float
            layer's output on the float model's inputs, not to its own float output (GPTAQ,
            arXiv:2504.02692; GPTQModel's ``v2``): the host runs the float model alongside.
        gptaq_alpha: how much of that correction to apply: 1 is the whole asymmetric objective,
            which overfits the calibration tokens where they are few; 0.25 is GPTQModel's default.
    """

    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    act_group_aware: bool = True
    mse: bool = False
    mse_weight: str = "hessian"
    block_size: int = 128
    gptaq: bool = False
    gptaq_alpha: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.gptaq_alpha <= 1:
            raise ConfigError("gptaq_alpha", self.gptaq_alpha, "a weight in [0, 1], e.g. 0.25")
        if not 0 < self.damp_percent < 1:
            raise ConfigError("damp_percent", self.damp_percent, "a fraction in (0, 1), e.g. 0.01")
        if self.block_size <= 0:
            raise ConfigError("block_size", self.block_size, "a positive number of columns, e.g. 128")
        if self.mse_weight not in ("hessian", "none"):
            raise ConfigError("mse_weight", self.mse_weight, '"hessian" or "none"')
        if self.static_groups and not self.desc_act:
            raise ConfigError("static_groups", self.static_groups, "to be used with desc_act = true")


_COARSE = torch.linspace(1.0, 0.2, 17)  # steps of 0.05
_FINE = torch.tensor([-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04])
_SEARCH_ELEMENTS = 1 << 22  # candidates x weights evaluated at once: 16 MB of float32


def find_params(W: Tensor, bits: int, symmetric: bool, mse: bool, column_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fit (scale, zero) per row of ``W: (rows, cols)``; with `mse`, shrink the range by the
    factor in [0.2, 1.0] that minimizes each row's squared error, each column's weighted by
    ``column_weight: (cols,)`` when given, as the reference's ``Quantizer.find_params(mse=True)``
    does (unweighted, with norm 2) on its grid of steps of 0.01.

    The grid is searched coarse to fine: steps of 0.05, then the eight 0.01 steps around each
    row's best (25 candidates instead of 81; on real weights the same choice on 94-99% of rows, total
    error within 0.1% of the exhaustive grid)."""
    xmin, xmax = W.amin(dim=1), W.amax(dim=1)
    scale, zero = minmax_params(xmin, xmax, bits, symmetric)
    scale = to_stored_precision(scale)
    if not mse:
        return scale, zero
    W = W.float()
    coarse = _COARSE.to(W.device)[:, None].expand(-1, W.shape[0])
    err, shrink = best_clip(W, xmin, xmax, coarse, bits, symmetric, column_weight, max_elements=_SEARCH_ELEMENTS)
    fine = (shrink[None] + _FINE.to(W.device)[:, None]).clamp(0.2, 1.0)
    fine_err, fine_shrink = best_clip(W, xmin, xmax, fine, bits, symmetric, column_weight, max_elements=_SEARCH_ELEMENTS)
    shrink = torch.where(fine_err < err, fine_shrink, shrink)
    scale, zero = minmax_params(xmin * shrink, xmax * shrink, bits, symmetric)
    return to_stored_precision(scale), zero


def _inverse_cholesky(H: Tensor, perm: Tensor | None, dead: Tensor, damp_percent: float, name: str) -> Tensor:
    """Return the upper Cholesky factor of ``(H' + damp * mean(diag H') * I)^-1``, raising damping on failure.

    ``H'`` is `H` in processing order (`perm`) with the diagonal of dead columns set to 1. `H` is
    not modified: one working copy is factored, inverted and factored again in place. The copy is
    laid out column-major (LAPACK's order; ``H'`` is symmetric, so its transpose view is the same
    matrix), which lets torch run all three LAPACK calls in it without a workspace copy: the peak
    is `H` and one copy (0.64 GB for an 8960-wide input) instead of three.
    """
    damp = damp_percent
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    while True:
        A = (H[perm[:, None], perm] if perm is not None else H.clone()).t()  # column-major view, no copy
        A.diagonal()[dead if perm is None else dead[perm]] = 1
        A.diagonal().add_(damp * A.diagonal().mean())
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return A.triu_()
        del A
        if damp >= 1.0:
            raise LlmquantError(
                f"GPTQ failed on {name}: the Hessian is not positive definite even with damp_percent=1.0; "
                f"give more or more varied calibration data, or leave the module unquantized with `ignore`"
            )
        log.warning("GPTQ on %s: Cholesky failed at damp_percent=%g, retrying at %g", name, damp, min(damp * 10, 1.0))
        damp = min(damp * 10, 1.0)


def _column_order(diag: Tensor, groups: int, size: int, config: GPTQConfig) -> Tensor | None:
    if config.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if config.act_group_aware and groups > 1:
        per_group = diag.view(groups, size)
        group_order = torch.argsort(per_group.amax(dim=1), descending=True, stable=True)
        inner = torch.argsort(per_group, dim=1, descending=True, stable=True)
        return (group_order[:, None] * size + inner[group_order]).flatten()
    return None


def gptq_quantize(W: Tensor, H: Tensor, config: GPTQConfig, name: str = "weight", dXXT: Tensor | None = None) -> UniformQuantized:
    """Quantize ``W: (out, in)`` against the Hessian ``H: (in, in)`` of its input (Algorithm 1).

    With ``dXXT: (in, in)`` (``2/n sum((x_float - x) x^T)``), the target is the float model's output
    on its own inputs (GPTAQ's objective, arXiv:2504.02692): ``||Q x - W x_float||^2`` equals GPTQ's
    objective around ``W* = W + W dXXT H^-1`` up to a constant, so the columns are quantized toward
    ``W + alpha * W dXXT H^-1`` (with the damped ``H^-1 = Hinv^T Hinv`` GPTQ factors anyway).
    GPTAQ itself applies the correction column by column inside the updates, keeping only the part
    that reaches columns not yet quantized; moved before the first column it is the whole
    correction (docs/algorithms.md compares the two).

    Returns:
        `UniformQuantized` with codes in the original column order and the g_idx its order implies.
    """
    out_features, in_features = W.shape
    size = check_groups((out_features, in_features), config.group_size, name)
    groups = in_features // size
    bits = config.bits
    W = W.float().clone()
    H = H.float()  # the caller's: read, never modified
    diag = torch.diag(H)
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0

    perm = _column_order(diag, groups, size, config)
    Hinv = _inverse_cholesky(H, perm, dead, config.damp_percent, name)
    if dXXT is not None:
        D = dXXT.float().clone()
        D[:, dead] = 0
        D = D[perm][:, perm] if perm is not None else D
        Wp = W[:, perm] if perm is not None else W
        shift = config.gptaq_alpha * ((Wp @ D) @ Hinv.T) @ Hinv  # alpha * W dXXT H^-1, in processing order
        if perm is not None:
            W[:, perm] += shift
        else:
            W += shift
        del D, shift
    # the search's weight of each column, in processing order: GPTQ charges err**2 / Hinv[j, j]**2
    weight = Hinv.diagonal().pow(-2) if config.mse and config.mse_weight == "hessian" else None
    g_of_col = torch.arange(in_features, device=W.device) // size  # group of each original column
    scales = torch.zeros(out_features, groups, device=W.device)
    zeros = torch.zeros(out_features, groups, dtype=torch.int32, device=W.device)
    fitted = torch.zeros(groups, dtype=torch.bool)
    if config.static_groups or config.group_size is None:
        original_weight = weight
        if weight is not None and perm is not None:
            original_weight = torch.empty_like(weight)
            original_weight[perm] = weight
        for g in range(groups):
            columns = slice(g * size, (g + 1) * size)
            scales[:, g], zeros[:, g] = find_params(W[:, columns], bits, config.symmetric, config.mse,
                                                    None if original_weight is None else original_weight[columns])
        if config.scale_grid is not None:
            scales = grid_scales(scales, config.scale_grid[0] // size, config.scale_grid[1])
        fitted[:] = True
    position = torch.arange(in_features, device=W.device)  # processing position of each original column
    if perm is not None:
        position[perm] = torch.arange(in_features, device=W.device)
        W = W[:, perm]
        if config.desc_act and not config.static_groups:
            g_of_col = torch.empty_like(g_of_col)
            g_of_col[perm] = torch.arange(in_features, device=W.device) // size
        group_in_order = g_of_col[perm]
    else:
        group_in_order = g_of_col

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=W.device)
    for i1 in range(0, in_features, config.block_size):
        i2 = min(i1 + config.block_size, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(group_in_order[i1 + i])
            if not fitted[g] and config.scale_grid is not None:
                # a super-block's groups share one step: fit them all now, from their current (updated) columns
                per_block = config.scale_grid[0] // size
                run = range(g // per_block * per_block, (g // per_block + 1) * per_block)
                for h in run:
                    at = position[h * size:(h + 1) * size]
                    current = torch.where((at >= i1) & (at < i2), W1[:, (at - i1).clamp(0, i2 - i1 - 1)], W[:, at])
                    scales[:, h], zeros[:, h] = find_params(current, bits, config.symmetric, config.mse,
                                                            None if weight is None else weight[at])
                scales[:, run.start:run.stop] = grid_scales(scales[:, run.start:run.stop], per_block, config.scale_grid[1])
                fitted[run.start:run.stop] = True
            if not fitted[g]:
                # the group's columns, in processing order, are contiguous from here (natural, act-group-aware
                # and act-order orders all visit a group's columns together)
                start = i1 + i
                scales[:, g], zeros[:, g] = find_params(_group_columns(W, W1, i1, i, size), bits, config.symmetric, config.mse,
                                                        None if weight is None else weight[start:start + size])
                fitted[g] = True
            w = W1[:, i]
            q = quantize_to_codes(w, scales[:, g], zeros[:, g], bits)
            codes[:, i1 + i] = q
            err = (w - (q.float() - zeros[:, g]) * scales[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        restored = torch.empty_like(codes)
        restored[:, perm] = codes
        codes = restored
    return UniformQuantized(codes=codes, scales=scales, zeros=zeros, g_idx=g_of_col.to(torch.int32),
                            bits=bits, group_size=config.group_size, symmetric=config.symmetric)


def _group_columns(W: Tensor, W1: Tensor, i1: int, i: int, size: int) -> Tensor:
    """Columns [i1 + i, i1 + i + size) of the partly updated weight, in processing order."""
    start = i1 + i
    inside = W1[:, i:i + size]
    if inside.shape[1] == size:
        return inside
    return torch.cat([inside, W[:, i1 + W1.shape[1]:start + size]], dim=1)


class GPTQ:
    """GPTQ with lazy batch updates; needs the Hessian of each layer's input."""

    name: ClassVar[str] = "gptq"
    description: ClassVar[str] = "GPTQ (arXiv:2210.17323): error feedback through the input Hessian; needs calibration"
    config_type: ClassVar[type[GPTQConfig]] = GPTQConfig
    result_type: ClassVar[type[UniformQuantized]] = UniformQuantized
    needs_calibration: ClassVar[bool] = True

    def quantize_weight(self, W: Tensor, config: GPTQConfig, stats: CalibrationStats | None) -> UniformQuantized:
        """Quantize ``W: (out, in)`` with ``stats.H: (in, in)``."""
        if stats is None:  # no calibration reached this weight (a rarely routed expert): round to nearest
            return minmax_quantize(W, config.bits, config.group_size, config.symmetric, config.scale_grid)
        if stats.H.shape != (W.shape[1], W.shape[1]):
            raise ShapeError(f"GPTQ: Hessian of shape {tuple(stats.H.shape)} does not match a weight of shape {tuple(W.shape)}")
        return gptq_quantize(W, stats.H, config, dXXT=stats.dXXT if config.gptaq else None)

    @staticmethod
    def wants_float_inputs(config: GPTQConfig) -> bool:
        """GPTAQ needs the float model's inputs beside the quantized model's."""
        return config.gptaq


@hookimpl
def llmquant_register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    register(GPTQ)
