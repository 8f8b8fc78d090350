"""Updates of the kept weights after a mask: ``update(W0, W, keep, stats, ...) -> W'``, all [out, in].

W0 is the dense layer before pruning, W the pruned one (already reconstructed by a solver),
or None for W0 masked by keep; keep is the mask (True = kept). Every update re-applies the
mask, so the sparsity it was given is the sparsity it returns. Registered here: 'none' and
energy compensation ('ec' = columns then rows, 'ec-col', 'ec-row'); SparseGPT's
reconstruction registers itself in ``sparsegpt.py``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .registry import UPDATES, constant
from .rowpass import Scratch, map_chunks, mask_as_float, sum_parts


def check_clamp(clamp: tuple[float, float]) -> None:
    lo, hi = clamp
    if not 0 <= lo <= 1 <= hi:
        raise ZprunerError(
            f"EC clamp range {lo},{hi} is invalid: it must contain 1 (no change), with 0 <= LO <= 1 <= HI; e.g. 0.5,2"
        )


@dataclass(frozen=True, kw_only=True)
class EnergyConstants:
    # default from the held-out experiment in experiments/open_constants.md
    ec_clamp: tuple[float, float] = constant((0.8, 1.25), "bounds of the EC scale factors", check=check_clamp,
                                             keyword="clamp")


@UPDATES.register("none")
def keep_only(W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats=None) -> torch.Tensor:
    """No correction: the pruned weights as they are."""
    return W0 * keep if W is None else W


def _gamma(e0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sqrt(E0 / E), and 1 where E = 0 (nothing kept, or all kept weights equal μ)."""
    return torch.where(e > 0, (e0 / e.where(e > 0, 1.0)).sqrt(), torch.ones_like(e))


def energy_scale(W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, γ) per slice along ``dim`` for energy compensation, unclamped.

    For each column (dim=0: statistics over the rows i of column j) or row (dim=1), with
    μ the mean of the dense slice W0: E0 = Σ (W0 − μ)² over the whole slice and
    E = Σ_kept (W − μ)²; γ = sqrt(E0 / E). Slices with E = 0 (nothing kept, or all kept
    weights equal μ) get γ = 1: there is nothing to scale.
    """
    mu = W0.mean(dim=dim, keepdim=True)
    e0 = (W0 - mu).square().sum(dim=dim, keepdim=True)
    e = ((W - mu) * keep).square().sum(dim=dim, keepdim=True)
    return mu, _gamma(e0, e)


def energy_compensate(
    W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, axes: tuple[str, ...] = ("col", "row"),
    clamp: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Energy compensation (statistical-correction paper, "EC"), in the order of ``axes``.

    Along each axis the kept weights move away from the dense slice mean μ so that their
    centred energy Σ_kept (W' − μ)² equals the dense slice's Σ (W0 − μ)²:
    W' = μ + clamp(γ)·(W − μ) on kept entries, 0 elsewhere. The clamp bounds how far one
    slice may be rescaled when most of its energy was pruned away. Returns a new tensor.
    """
    return energy_compensate_(W0, W.float() * keep, keep, axes, clamp)


def energy_compensate_(
    W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, axes: tuple[str, ...] = ("col", "row"),
    clamp: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """``energy_compensate`` in place on W: float32 [out, in], already zero where not kept;
    or W None for W0 masked by keep, then written to a new tensor (returned).

    The same quantities as the textbook form, in few passes (see ``rowpass`` for why
    passes, not flops, are the cost here):
    - a column step needs every row before its scale is known, so its statistics are one
      pass of their own; its rescale is folded into the pass of the following row step,
      whose statistics and rescale both finish within a chunk of rows;
    - on kept entries μ + γ·(W − μ) = γ·W + (1 − γ)·μ, and W is 0 elsewhere, so the
      rescale with the mask re-applied is W·γ + keep·(1 − γ)·μ: two ops, not four;
      likewise (W − μ)·keep = W − keep·μ;
    - with W None, the masked copy of W0 is made chunk by chunk inside the first pass
      that writes W, not as a whole-matrix product with a bool mask beforehand.
    These regroupings change results by float32 rounding only (tested to 1e-6 relative).
    """
    lo, hi = clamp
    W0 = W0.float()
    fresh = W is None  # W still to be made: W0·keep, chunk by chunk in the first writing pass
    if fresh:
        W = torch.empty_like(W0)
    pending = None  # a column step's (γ, (1 − γ)·μ) whose rescale is still to be applied

    def gamma_and_offset(mu: torch.Tensor, e0: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = _gamma(e0, e).clamp(lo, hi)
        return gamma, (1 - gamma) * mu

    def block_of(rows: slice, kept: torch.Tensor) -> torch.Tensor:
        return torch.mul(W0[rows], kept, out=W[rows]) if fresh else W[rows]

    def column_statistics(mu: torch.Tensor):
        def part(rows: slice, scratch: Scratch) -> torch.Tensor:
            d = torch.sub(W0[rows], mu, out=scratch.get(0, rows.stop - rows.start))
            kept = mask_as_float(keep[rows], scratch.get(1, d.shape[0]))
            if fresh:  # ((W0·keep − μ)·keep)² = (W0 − μ)²·keep: reuse the squares of E0
                e0 = d.square_().sum(dim=0, keepdim=True)
                return torch.cat([e0, kept.mul_(d).sum(dim=0, keepdim=True)])
            dk = torch.addcmul(W[rows], kept, mu, value=-1, out=scratch.get(2, d.shape[0]))
            return torch.cat([d.square_().sum(dim=0, keepdim=True), dk.square_().sum(dim=0, keepdim=True)])
        return part

    def column_rescaled(rows: slice, kept: torch.Tensor) -> torch.Tensor:
        """W's rows after the pending column rescale, the mask re-applied."""
        gamma, offset = pending
        if fresh:  # (W0·γ + (1 − γ)·μ)·keep, straight from W0
            return torch.addcmul(offset, W0[rows], gamma, out=W[rows]).mul_(kept)
        return W[rows].mul_(gamma).addcmul_(kept, offset)

    def column_rescale(rows: slice, scratch: Scratch) -> None:
        column_rescaled(rows, mask_as_float(keep[rows], scratch.get(1, rows.stop - rows.start)))

    def row_step(rows: slice, scratch: Scratch) -> None:
        dense = W0[rows]
        kept = mask_as_float(keep[rows], scratch.get(1, dense.shape[0]))
        block = column_rescaled(rows, kept) if pending is not None else block_of(rows, kept)
        mu = dense.mean(dim=1, keepdim=True)
        buf = scratch.get(0, block.shape[0])
        e0 = torch.sub(dense, mu, out=buf).square_().sum(dim=1, keepdim=True)
        e = torch.addcmul(block, kept, mu, value=-1, out=buf).square_().sum(dim=1, keepdim=True)
        gamma, offset = gamma_and_offset(mu, e0, e)
        block.mul_(gamma).addcmul_(kept, offset)

    for axis in (*axes, None):
        if pending is not None and axis != "row":
            map_chunks(column_rescale, W, 2)
            pending, fresh = None, False
        if axis == "col":
            mu = W0.mean(dim=0, keepdim=True)
            e0, e = sum_parts(map_chunks(column_statistics(mu), W, 3)).split(1)
            pending = gamma_and_offset(mu, e0, e)
        elif axis == "row":
            map_chunks(row_step, W, 2)
            pending, fresh = None, False
        elif axis is not None:
            raise ZprunerError(f"EC axis '{axis}' is unknown; choose 'col' or 'row'")
    if fresh:  # no axes: W is just the masked copy
        def mask_only(rows: slice, scratch: Scratch) -> None:
            block_of(rows, mask_as_float(keep[rows], scratch.get(0, rows.stop - rows.start)))

        map_chunks(mask_only, W)
    return W


def _energy(axes: tuple[str, ...], W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats=None, *,
            clamp: tuple[float, float]) -> torch.Tensor:
    # W is the caller's own float32 copy (or None): EC may work in place
    return energy_compensate_(W0, W, keep, axes, clamp)


# In the order the statistical-correction paper's ablation adds them.
for _name, _axes in (("ec-col", ("col",)), ("ec-row", ("row",)), ("ec", ("col", "row"))):
    UPDATES.register(_name, constants=EnergyConstants)(functools.partial(_energy, _axes))
