"""Column reductions of a weight matrix [out, in] at torch's own bits, faster than torch's
kernels on the CPU: the column norms of Z-Pruner's column normalisation and the column
variances of CVR (``benchmarks/column_reductions.py``). Elsewhere (GPU, other dtypes,
layouts torch reduces another way) torch's own kernel runs.
"""
from __future__ import annotations

import functools

import torch

from . import native, rowpass
from .rowpass import Scratch, map_chunks


def column_norm(W: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖₂: [in], the bits of torch's ``W.norm(dim=0)``, 12 to 14 times faster on a
    LLaMA-2-13B float32 CPU matrix (``benchmarks/column_reductions.py``).

    Torch's CPU kernel reduces each column on its own: a sequential float32 sum of the
    rounded squares down the rows, one strided walk per column, then a correctly rounded
    square root. ``index_add_`` with every row sent to one index runs the same sequential
    sum for all columns at once, a contiguous row at a time; the root is taken in float64,
    which rounds to the correctly rounded float32 one (torch's vectorised float32 sqrt is
    not: it differs in the last bit for about 1 % of values here). Whether this build of
    torch sums as assumed (a compiler may fuse the multiply-add) is checked once, on a
    probe matrix; if not, off the CPU or float32, and where torch reduces another way (a
    column-major matrix, whose columns it sums in vector lanes; a single row or column),
    torch's own kernel runs.
    """
    if W.device.type != "cpu" or W.dtype != torch.float32 or not W.is_contiguous() or W.dim() != 2 \
            or min(W.shape) < 2 or not _sequential_column_sum_is_torchs():
        return W.norm(dim=0)
    return _sequential_column_norm(W)


_NORM_ROWS = 256  # rows squared per step into a small buffer (cache-sized at 5120 columns)


def _sequential_column_norm(W: torch.Tensor) -> torch.Tensor:
    total = W.new_zeros(1, W.shape[1])
    rows = min(_NORM_ROWS, W.shape[0])
    one_index = torch.zeros(rows, dtype=torch.long)
    squares = W.new_empty(rows, W.shape[1])
    for a in range(0, W.shape[0], rows):
        b = min(a + rows, W.shape[0])
        block = torch.mul(W[a:b], W[a:b], out=squares[:b - a])
        total.index_add_(0, one_index[:b - a], block)
    return total[0].double().sqrt_().float()


@functools.cache
def _sequential_column_sum_is_torchs() -> bool:
    # 512 rows x 256 columns: a fused multiply-add changes 42 of them (a float64 emulation
    # of one), so a build that fuses cannot pass by chance
    W = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    return torch.equal(_sequential_column_norm(W), W.norm(dim=0))


# Relative distance from a float32 rounding boundary below which column_variance takes a
# column from torch's kernel. Torch's Welford result and the sums here are both within
# about n·2⁻⁵³ of the exact value: with no margin at all, none of 38016 random columns of
# LLaMA and SmolLM2 shapes rounded otherwise than torch's
# (experiments/column_variance_margin.py), and of SmolLM2's 149,760 real ones the one that
# does lies 6e-17 from the boundary. 1e-10 sends 0.2 % of the columns to torch (1e-9, the
# margin before: 2.3 %, whose strided reads cost 0.015 s on a 13824 x 5120 matrix).
_TIE_MARGIN = 1e-10

# Rows per step of column_variance's float64 sums over a matrix larger than a chunk: a
# 64 x 5120 block (2.6 MB in float64) stays in a core's cache between its two products
# (faster so than in chunks of CHUNK_ELEMENTS or as torch's sum(0), in a session test). A
# matrix of at most a chunk is one step: in 64-row steps a SmolLM2 MLP projection took
# 3.4 ms against 0.6 ms, the worker threads' hand-offs (benchmarks/column_reductions.py).
_MOMENT_ROWS = 64
_KERNEL = ("columns_kernel", (
    ("column_moments", (native.POINTER, native.INT64, native.INT64, native.INT64, native.POINTER, native.POINTER)),
))


def column_variance(W: torch.Tensor) -> torch.Tensor:
    """Var_i W_ij over the rows (population variance): [in], the bits of torch's
    ``W.var(dim=0, unbiased=False)``, 2.5 to 4.5 times faster on a large float32 CPU matrix
    (``benchmarks/column_reductions.py``).

    Torch's CPU kernel runs Welford's recurrence in float64, one element at a time, and
    rounds the result to float32 once. One pass over row chunks in float64 gives Σx and
    Σx², and Σx² − (Σx)²/n lands within (3n + 5)·2⁻⁵³·Σx² of the exact centred energy
    (each term is within n·2⁻⁵³·Σx², as |Σx| ≤ sqrt(n·Σx²)). Where that bound is below a
    quarter of _TIE_MARGIN of the energy (a column whose mean is not large against its
    spread: all of SmolLM2's), the variance rounds to the same float32 as torch's except
    where the exact value lies next to the middle between two float32s; such columns, and those with
    a larger bound, are taken from torch's kernel itself. A float32 formula moved the
    SmolLM2 CVR 50 % cell from 81.951 to 81.870 (issue 14), and verified results stay as
    they are. Elsewhere torch's own kernel: on a GPU or another dtype it accumulates
    otherwise, and for a single column it takes another path.
    """
    if W.device.type != "cpu" or W.dtype != torch.float32 or W.shape[1] < 2:
        return W.var(dim=0, unbiased=False)
    n = W.shape[0]
    kernel = native.load(*_KERNEL) if native.fits(W, layout="rows") else None

    def moments(rows: slice, _scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
        # Σ and Σ² down the columns (the bound above holds for any order of summation):
        # compiled, one read of the rows; or as products with a vector of ones (why in
        # steps of _MOMENT_ROWS: there)
        if kernel is not None:
            sums = torch.zeros(2, W.shape[1], dtype=torch.float64)
            kernel.column_moments(W[rows.start].data_ptr(), W.stride(0), rows.stop - rows.start, W.shape[1],
                                  sums[0].data_ptr(), sums[1].data_ptr())
            return sums[0], sums[1]
        block = W[rows].double()
        ones = block.new_ones(block.shape[0])
        return ones @ block, ones @ block.square_()

    step = _MOMENT_ROWS if kernel is None and W.numel() > rowpass.CHUNK_ELEMENTS else None
    parts = map_chunks(moments, W, 0, rows=step)
    total = sum(part[0] for part in parts)
    squares = sum(part[1] for part in parts)
    energy = squares - total * total / n
    variance = energy / n
    error_bound = (3 * n + 5) * 2.0**-53 * squares / energy  # relative to the energy
    # A column is sent to torch when a float32 rounding boundary lies within _TIE_MARGIN of
    # its variance, or when the bound above is not well inside that margin
    near_a_tie = (variance * (1 + _TIE_MARGIN)).float() != (variance * (1 - _TIE_MARGIN)).float()
    near_a_tie |= ~((energy > 0) & (error_bound < _TIE_MARGIN / 4))  # also a column with no spread
    variance = variance.float()
    if near_a_tie.any():
        # two columns at least: torch reduces a lone column another way
        columns = torch.cat([near_a_tie.nonzero().flatten(), torch.tensor([0, 1])])
        variance[columns] = W.index_select(1, columns).var(dim=0, unbiased=False)
    return variance
