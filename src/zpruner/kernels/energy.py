"""Energy compensation (``updates.energy_compensate``) in chunked passes over the rows:
all [out, in] float32, keep bool (True = kept).

Why: EC's textbook form is about twenty whole-matrix expressions per axis, each a pass
over memory with a fresh full-size temporary (``rowpass``'s docstring says what those
cost); here each axis is one or two passes over chunks of rows, in place, with the
textbook's bits wherever a chunk's sums are the whole matrix's.
"""
from __future__ import annotations

import torch

from ..errors import ZprunerError
from .rowpass import Scratch, map_chunks, mask_as_float, sum_parts


def _gamma(e0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sqrt(E0 / E), and 1 where E = 0: ``updates.energy_scale``'s γ."""
    return torch.where(e > 0, (e0 / e.where(e > 0, 1.0)).sqrt(), torch.ones_like(e))


def energy_compensate_(
    W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, axes: tuple[str, ...] = ("col", "row"),
    clamp: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """``updates.energy_compensate`` in place on W: float32 [out, in], already zero where
    not kept; or W None for W0 masked by keep, then written to a new tensor (returned).

    The textbook form in fewer passes (see ``rowpass`` for why passes, not flops, are the
    cost here), bit for bit but for the column sums of a matrix larger than a chunk.
    Elementwise arithmetic is the same whether it runs over the whole matrix or a chunk of
    rows, and so is a reduction along a row; a reduction along a column is not (its
    summation order depends on how many rows it sees). Hence:
    - a column step's two energies are summed in one pass, per chunk of rows, the chunks'
      sums added in chunk order: the textbook bits when the matrix is one chunk (every
      SmolLM2 layer, so its verified +EC cells), float32 reassociation otherwise (within
      1e-6, relative; the same on any thread count). Its rescale is folded into the pass
      of the following row step;
    - a row step's statistics and rescale finish within a chunk of rows;
    - every expression keeps the textbook order of operations: (W − μ)·keep, squared;
      (μ + γ·(W − μ))·keep. (Regroupings such as γ·W + keep·(1 − γ)·μ are equal in exact
      arithmetic only, and moved the verified SmolLM2 +EC perplexities by up to 0.13 %.)
    - with W None, the masked copy of W0 is made chunk by chunk inside the first pass
      that writes W, not as a whole-matrix product with a bool mask beforehand.
    No compiled kernel: one summed in float64 (faster on large layers) gave other weights
    above a chunk than these passes, so the same command gave other weights with a C
    compiler and without, and torch's float32 sums are not reproducible in C across torch
    versions and CPUs.
    """
    for axis in axes:
        if axis not in ("col", "row"):
            raise ZprunerError(f"EC axis '{axis}' is unknown; choose 'col' or 'row'")
    passes = _Passes(W0.float(), W, keep, clamp)
    for axis in axes:
        if passes.pending is not None and axis == "col":
            passes.run(passes.column_rescale, 1)
        if axis == "col":
            passes.pending = passes.column_step()
        else:
            passes.run(passes.row_step, 2)
    if passes.pending is not None or passes.fresh:  # a last column rescale, or no axes: just the masked copy
        passes.run(passes.column_rescale, 1)
    return passes.W


class _Passes:
    """The state between EC's passes: W (made from W0 by the first pass that writes it, while
    ``fresh``) and a column step's (μ, γ) whose rescale is still ``pending``."""

    def __init__(self, W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, clamp: tuple[float, float]):
        self.W0, self.keep, self.clamp = W0, keep, clamp
        self.fresh = W is None  # W still to be made: W0·keep, chunk by chunk in the first writing pass
        self.W = torch.empty_like(W0) if W is None else W
        self.pending = None

    def run(self, rows_pass, buffers: int) -> None:
        """A pass over W's chunks of rows; after it, W is made and no rescale is pending."""
        map_chunks(rows_pass, self.W, buffers)
        self.pending, self.fresh = None, False

    def masked(self, rows: slice, kept: torch.Tensor) -> torch.Tensor:
        """W's rows: made from W0 in this pass if W is still fresh."""
        return torch.mul(self.W0[rows], kept, out=self.W[rows]) if self.fresh else self.W[rows]

    @staticmethod
    def rescale(block: torch.Tensor, kept: torch.Tensor, mu: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """(μ + γ·(W − μ))·keep in place on block (same bits as the out-of-place form)."""
        return block.sub_(mu).mul_(gamma).add_(mu).mul_(kept)

    def current(self, rows: slice, kept: torch.Tensor) -> torch.Tensor:
        """W's rows after the steps so far: the pending column rescale applied here."""
        block = self.masked(rows, kept)
        return block if self.pending is None else self.rescale(block, kept, *self.pending)

    def column_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        W0, keep, fresh = self.W0, self.keep, self.fresh
        mu = W0.mean(dim=0, keepdim=True)

        def energies(rows: slice, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
            n = rows.stop - rows.start
            kept = mask_as_float(keep[rows], scratch.get(0, n))
            buf = scratch.get(1, n)
            e0 = torch.sub(W0[rows], mu, out=buf).square_().sum(dim=0, keepdim=True)
            if fresh:
                # W = W0·keep: ((W − μ)·keep)² is (W0 − μ)²·keep to the bit (·1 exact, and
                # a dropped entry's square is +0 either way), so the squares of e0 serve,
                # and W is made by the next pass that writes it
                return e0, buf.mul_(kept).sum(dim=0, keepdim=True)
            e = torch.sub(self.W[rows], mu, out=buf).mul_(kept).square_().sum(dim=0, keepdim=True)
            return e0, e

        parts = map_chunks(energies, self.W, 2)
        e0, e = (sum_parts([part[i] for part in parts]).view(mu.shape) for i in (0, 1))
        return mu, _gamma(e0, e).clamp(*self.clamp)

    def column_rescale(self, rows: slice, scratch: Scratch) -> None:
        self.current(rows, mask_as_float(self.keep[rows], scratch.get(0, rows.stop - rows.start)))

    def row_step(self, rows: slice, scratch: Scratch) -> None:
        dense = self.W0[rows]
        kept = mask_as_float(self.keep[rows], scratch.get(1, dense.shape[0]))
        block = self.current(rows, kept)
        mu = dense.mean(dim=1, keepdim=True)
        buf = scratch.get(0, block.shape[0])
        e0 = torch.sub(dense, mu, out=buf).square_().sum(dim=1, keepdim=True)
        block.sub_(mu)  # the rescale's first step, done before E needs it: one op fewer
        e = torch.mul(block, kept, out=buf).square_().sum(dim=1, keepdim=True)
        block.mul_(_gamma(e0, e).clamp(*self.clamp)).add_(mu).mul_(kept)
