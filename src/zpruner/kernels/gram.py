"""XᵀX of calibration activations accumulated over half the matrix, on the CPU's threads.

Why: SparseGPT's (and ADMM's) Hessian is Σ xᵀx over every calibration batch, one
tokens x d² product per batch, and on SmolLM2 these products were a fifth of SparseGPT's
pruning time; at LLaMA sizes (d = 11008 for down_proj) they are the largest single cost
of a block's statistics pass. XᵀX is symmetric, so the rows of each panel of the matrix
need only their columns from the diagonal on: ``acc[i0:i1, i0:] += x[:, i0:i1]ᵀ x[:, i0:]``,
(n + 1) / 2n of the multiply-adds for n panels (5/8 for four, 56 % for eight). The part
below the panels is copied from the part above when the sum is read (``mirror``).

Rounding: ``addmm_`` on the whole matrix (what the engine always did, whose bits the
verified SparseGPT results have) rounds each element as the BLAS's summation order does.
A panel product, run on one thread, gives each of its elements the same bits as long as
the BLAS walks the token dimension the same way for both shapes, which depends on the
library, its kernels for the CPU, and whether the whole-matrix product split the tokens
between threads. So the panels are used only where a probe on the first batch of the very
same shape (tokens, d, thread count) gives the whole-matrix product's bits exactly
(``agrees``); elsewhere, and on other devices, the whole-matrix ``addmm_`` stays. The
order of a BLAS sum does not depend on the values, so one probe per shape answers for all
data of that shape.
"""
from __future__ import annotations

import torch

from .rowpass import map_threads

# Measured on this machine (benchmarks/gram.py, output in benchmarks/out/gram.txt). Rows per
# panel, at least: with MKL, panels of 64-128 rows round differently from the whole product
# and panels of 192 or more round the same; fewer, larger panels save less. Panels, at
# least: right after an op on torch's own threads, as in a statistics pass, three panels
# (d = 576) took 0.94 times the whole product (1.05 times in a SmolLM2 SparseGPT run,
# gram.py --pruning in the same output), four 0.86, eight 0.67.
PANEL_ROWS = 192
MIN_PANELS = 4


def panel_edges(d: int) -> list[int] | None:
    """Row boundaries of the panels for a d x d sum, or None where panels would not pay."""
    n = d // PANEL_ROWS
    return [d * i // n for i in range(n + 1)] if n >= MIN_PANELS else None


def add_upper(acc: torch.Tensor, x: torch.Tensor, edges: list[int]) -> None:
    """acc[i0:i1, i0:] += x[:, i0:i1]ᵀ x[:, i0:] for every panel, each on one torch thread:
    the panels above and on the diagonal of acc += xᵀx; the part below them is left as it was."""
    def panel(p: int) -> None:
        i0, i1 = edges[p], edges[p + 1]
        acc[i0:i1, i0:].addmm_(x[:, i0:i1].t(), x[:, i0:])

    map_threads(panel, list(range(len(edges) - 1)))


def mirror(acc: torch.Tensor, edges: list[int]) -> None:
    """Fill the part of acc below the panels with the transpose of the part above (copies,
    exact bits)."""
    for p in range(1, len(edges) - 1):
        i0, i1 = edges[p], edges[p + 1]
        acc[i0:i1, :i0].copy_(acc[:i0, i0:i1].t())


def panels_for(x: torch.Tensor) -> list[int] | None:
    """The panel edges to accumulate xᵀx of x: [tokens, d] with, or None for the whole
    product; the first batch of each shape (and thread count) is the probe's."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return None
    edges = panel_edges(x.shape[1])
    if edges is None:
        return None
    key = (*x.shape, torch.get_num_threads())
    if key not in _verdicts:
        _verdicts[key] = agrees(x, edges)
    return edges if _verdicts[key] else None


_verdicts: dict[tuple[int, int, int], bool] = {}


def agrees(x: torch.Tensor, edges: list[int]) -> bool:
    """Whether the panels of x: [tokens, d] give ``addmm_``'s bits onto a non-zero sum (so
    that where the sum is added matters), and the whole product is exactly symmetric (so
    that a mirrored part is what it would have computed). One extra d x d matrix: the
    probe runs during a statistics pass, beside the block's accumulators."""
    d = x.shape[1]
    whole = torch.full((d, d), 0.5).addmm_(x.t(), x)

    def same(p: int) -> bool:
        i0, i1 = edges[p], edges[p + 1]
        panel = torch.full((i1 - i0, d - i0), 0.5).addmm_(x[:, i0:i1].t(), x[:, i0:])
        return _same_bits(panel, whole[i0:i1, i0:]) and _same_bits(whole[i0:, i0:i1].t(), whole[i0:i1, i0:])

    return all(map_threads(same, list(range(len(edges) - 1))))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # -0.0 and NaN payloads too
