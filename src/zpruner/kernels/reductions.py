"""Whole-matrix scalars of the Z-Pruner score (``zpruner.scores.zpruner``: the means and
stds that standardise its two normalised matrices, and α's fraction of small weights),
as torch computes them on two threads, whatever the thread count.

A full reduction in torch depends on its thread count: from GRAIN elements on, each thread
sums its own contiguous share (cascade sums in float32 for a sum or mean; a sequential
float64 sum of squared deviations for a std), then the shares are added. The verified
Table 1 (experiments/quick_table/) was measured on two threads, and the float32 mean of a
normalised matrix moves in its last bit with the split, which flips some of Z-Pruner's N:M
choices: SmolLM2 4:8 gives 117.385 on two threads, 118.113 on one. So these scalars are
always computed as two shares on one thread each: the two-thread results, on any machine
and any thread count.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

from . import native, rowpass
from .rowpass import Scratch, map_chunks, map_threads, sum_parts

T = TypeVar("T")

_REDUCTION_SHARES = 2
_GRAIN = 32768  # at::internal::GRAIN_SIZE: fewer elements are reduced in one share
# float64 elements per step of a share's sequential sum. Measured (git show 01260ff:benchmarks/README.md,
# "Z-Pruner's std"): 1 << 18 takes a 576 x 576 std from 3.2 ms to 0.8 ms against 1 << 20
# (two 8 MB buffers per call are fresh pages each time), and a 13824 x 5120 one from 86 ms
# to 97 ms.
_STD_CHUNK = 1 << 18
# Safety factor on matrix_std's bound between its two sums (the bound is first-order in
# 2⁻⁵³; the second-order terms stay below 0.1 % of it for any matrix under 2⁴⁰ elements)
_STD_SLACK = 1.01
_EXACT_COUNT = 1 << 24  # float32 holds every integer below this

_KERNEL = ("reductions_kernel", (
    ("sum_squared_deviations", (native.POINTER, native.INT64, native.DOUBLE), native.DOUBLE),
    ("count_below", (native.POINTER, native.INT64, native.FLOAT), native.INT64),
))


def _reduction_kernel(X: torch.Tensor):
    """The compiled reductions of ``reductions_kernel.c`` for a contiguous float32 CPU matrix
    (any size: their results are exact, or decided by a bound that holds in any order)."""
    return native.load(*_KERNEL) if native.fits(X) else None


def _shares(n: int) -> list[slice]:
    """The contiguous ranges torch's parallel_for gives its threads (two, from _GRAIN on)."""
    parts = min(_REDUCTION_SHARES, max(1, -(-n // _GRAIN))) if n >= _GRAIN else 1
    size = -(-n // parts)
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _over_shares(fn: Callable[[slice], T], n: int, shares: list[slice] | None = None) -> list[T]:
    """[fn(share) for each share of n elements], each on one torch thread; the shares of a
    matrix smaller than a chunk (all of SmolLM2's) on the calling thread, where handing
    them to the worker threads costs more than it saves (576 x 576: 6.6 ms against 5.6 ms
    for the whole score)."""
    return map_threads(fn, shares or _shares(n), workers=None if n >= rowpass.CHUNK_ELEMENTS else 1)


def matrix_mean(X: torch.Tensor) -> torch.Tensor:
    """X.mean() as torch computes it on two threads: Σ of each share's sum, then / n."""
    flat = X.reshape(-1)
    return sum_parts(_over_shares(lambda share: flat[share].sum(), flat.numel())).div_(flat.numel())


def matrix_std(X: torch.Tensor, mean: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """X.std() (unbiased) as torch computes it on two threads, given ``matrix_mean(X)``:
    Σ (x − mean)² in float64, sequentially within each share, the shares added in order.

    The sequential sum (a cumulative sum, element after element) is the slow part, so the
    same float64 terms are first summed in another order (``fast``: torch's vectorised sum a
    step at a time, the steps' sums added exactly rounded). The sequential sum of a share
    of N non-negative terms is within (N − 1)·2⁻⁵³ of the exact sum and the fast one within
    (step − 1)·2⁻⁵³; if every total in that range gives the same float32 std, it is the
    sequential sum's float32 std too; otherwise (a rounding boundary that close) the
    sequential sum runs as well (``benchmarks/zpruner_std.py`` counts how often, and times
    both).
    """
    flat = X.reshape(-1)
    m = float(mean)
    shares = _shares(flat.numel())
    longest = max(share.stop - share.start for share in shares)
    step = min(_STD_CHUNK, longest)

    def sequential_sum(share: slice) -> float:
        # [running sum, (x − m)² of the next elements]; its cumulative sum is the sequential one
        terms = torch.empty(step + 1, dtype=torch.float64, device=X.device)
        sums = torch.empty_like(terms)
        running = 0.0
        for a in range(share.start, share.stop, step):
            b = min(a + step, share.stop)
            part = terms[:b - a + 1]
            part[0] = running
            part[1:].copy_(flat[a:b]).sub_(m).square_()
            running = float(torch.cumsum(part, 0, out=sums[:b - a + 1])[-1])
        return running

    kernel = _reduction_kernel(flat)

    def fast_sum(share: slice) -> float:
        # the same terms, each step summed on its own and the steps' sums added exactly
        # rounded: within (step − 1)·u of the exact sum, u = 2⁻⁵³, in any order within a step
        # (the compiled one: float64 lanes, one read of X instead of four passes)
        if kernel is not None:
            return math.fsum(kernel.sum_squared_deviations(flat[a].data_ptr(), min(a + step, share.stop) - a, m)
                             for a in range(share.start, share.stop, step))
        terms = torch.empty(step, dtype=torch.float64, device=X.device)
        sums = []
        for a in range(share.start, share.stop, step):
            b = min(a + step, share.stop)
            sums.append(float(terms[:b - a].copy_(flat[a:b]).sub_(m).square_().sum()))
        return math.fsum(sums)

    def std(total: float) -> torch.Tensor:
        var = total / max(0.0, flat.numel() - 1)
        return torch.tensor(math.sqrt(var), dtype=torch.float64).to(device=X.device, dtype=torch.float32)

    if fast and flat.numel() > 1:
        total = sum_parts(_over_shares(fast_sum, flat.numel(), shares))
        # A sequential sum of N non-negative terms is within (N − 1)·u of the exact one, the
        # fast one within (step − 1)·u, and adding the shares' sums costs u in each
        slack = _STD_SLACK * (longest + step + 2) * 2.0**-53
        if math.isfinite(total) and torch.equal(std(total * (1 - slack)), std(total * (1 + slack))):
            return std(total)
    return std(sum_parts(_over_shares(sequential_sum, flat.numel(), shares)))


def fraction_below_(X: torch.Tensor, threshold: torch.Tensor,
                    then: Callable[[slice], object] | None = None) -> torch.Tensor | None:
    """(X < threshold).float().mean() for X [out, in] as ``matrix_mean`` computes it, mostly
    without the float matrix: a share's float32 sum of ones is its count exactly while the
    count is below 2²⁴ (every partial sum is then an integer float32 holds). Above, the
    ones are written into X itself and summed as they are.

    Counted a chunk of rows at a time (each chunk's elements split between the shares),
    so the comparison's bool temporary comes from the allocator's free lists, not as fresh
    pages (rowpass's docstring). ``then(rows)``, if given, runs on each chunk once it is
    counted and may overwrite X's rows (the caller's next pass, saving a read of X); if X
    is then needed as floats (a share's count of 2²⁴ or more), nothing is written into it
    and None is returned: the caller must compute the fraction again from a fresh X."""
    flat = X.reshape(-1)
    shares = _shares(flat.numel())
    kernel = _reduction_kernel(X)

    def below(a: int, b: int) -> int:
        if kernel is None:
            return int(torch.count_nonzero(flat[a:b] < threshold))
        return kernel.count_below(flat[a].data_ptr(), b - a, float(threshold)) if b > a else 0

    def count(rows: slice, _scratch: Scratch) -> list[int]:
        first, last = rows.start * X.shape[1], rows.stop * X.shape[1]
        counts = [below(max(first, share.start), min(last, share.stop)) for share in shares]
        if then is not None:
            then(rows)
        return counts

    counts = [sum(share_counts) for share_counts in zip(*map_chunks(count, X, 0))]
    if max(counts) >= _EXACT_COUNT:
        return None if then is not None else matrix_mean(torch.lt(X, threshold, out=X))
    parts = [torch.tensor(float(count), dtype=torch.float32, device=X.device) for count in counts]
    return sum_parts(parts).div_(flat.numel())
