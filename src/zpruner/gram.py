"""XᵀX of calibration activations accumulated over half the matrix, on the CPU's threads.

Why: SparseGPT's (and ADMM's) Hessian is Σ xᵀx over every calibration batch, one
tokens x d² product per batch, and on SmolLM2 these products were a fifth of SparseGPT's
pruning time; at LLaMA sizes (d = 11008 for down_proj) they are the largest single cost
of a block's statistics pass. XᵀX is symmetric, so the rows of each panel of the matrix
need only their columns from the diagonal on: ``acc[i0:i1, i0:] += x[:, i0:i1]ᵀ x[:, i0:]``,
about 55-65 % of the multiply-adds once there are six or more panels. The part below the
panels is copied from the part above when the sum is read (``mirror``).

Rounding: ``addmm_`` on the whole matrix (what the engine always did, whose bits the
verified SparseGPT results have) rounds each element as the BLAS's summation order does.
A panel product, run on one thread, gives each of its elements the same bits as long as
the BLAS walks the token dimension the same way for both shapes, which depends on the
library, its kernels for the CPU, and whether the whole-matrix product split the tokens
between threads. So the panels are used only where a probe on random data of the very
same shape (tokens, d, thread count) gives the whole-matrix product's bits exactly
(``agrees``); elsewhere, and on other devices, the whole-matrix ``addmm_`` stays. The
order of a BLAS sum does not depend on the values, so one probe per shape answers for all
data of that shape.
"""
from __future__ import annotations

import functools

import torch

from .rowpass import map_threads

# Rows per panel, at least. Measured on this machine (benchmarks/gram.py, output in
# benchmarks/gram.txt): with MKL, panels of 64-128 rows round differently from the whole
# product and panels of 192 or more round the same; fewer, larger panels save less.
PANEL_ROWS = 192


def panel_edges(d: int) -> list[int] | None:
    """Row boundaries of the panels for a d x d sum, or None where panels would not pay:
    below three panels the largest one holds most of the work and the threads wait for it."""
    n = d // PANEL_ROWS
    return [d * i // n for i in range(n + 1)] if n >= 3 else None


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
    """The panel edges to accumulate xᵀx of x: [tokens, d] with, or None for the whole product."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return None
    edges = panel_edges(x.shape[1])
    if edges is None or not agrees(x.shape[0], x.shape[1], torch.get_num_threads()):
        return None
    return edges


@functools.cache
def agrees(tokens: int, d: int, threads: int) -> bool:
    """Whether panels give ``addmm_``'s bits for x: [tokens, d] on ``threads`` torch threads:
    two accumulated batches of random data (the second onto a non-zero sum), both ways."""
    edges = panel_edges(d)
    if edges is None:
        return False
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(tokens, d, generator=generator) for _ in range(2)]
    whole, halves = torch.zeros(d, d), torch.zeros(d, d)
    for x in xs:
        whole.addmm_(x.t(), x)
        add_upper(halves, x, edges)
    mirror(halves, edges)
    return torch.equal(whole.view(torch.int32), halves.view(torch.int32))  # -0.0 too
