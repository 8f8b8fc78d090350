"""Importance scores: pure functions ``score(W, stats, **constants) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered (``zpruner.registry``) with the
statistics it needs, its default comparison group and the dataclass of its constants; a new
method is one decorated function here or in a module of its own. SparseGPT is the one
method that is not a score: it chooses its mask inside its reconstruction (a solver, see
``sparsegpt.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .kernels.columns import column_norm, column_variance
from .errors import ZprunerError
from .registry import SCORES, Method, constant, get_method
from .kernels import native, rowpass
from .kernels.rowpass import Scratch, map_chunks, map_threads, sum_parts
from .stats import ActivationStats

T = TypeVar("T")


def get_score(name: str) -> Method:
    method = get_method(name)
    if method.kind != "score":
        raise ZprunerError(f"method '{name}' chooses its mask inside its solver and has no score")
    return method


@dataclass(frozen=True, kw_only=True)
class RiaConstants:
    ria_exponent: float = constant(0.5, "RIA activation exponent a", minimum=0.0, keyword="a")


@dataclass(frozen=True, kw_only=True)
class CvrConstants:
    # defaults from the held-out experiment in experiments/open_constants.md
    cvr_alpha: float = constant(1.0, "CVR weight-variance exponent", minimum=0.0, keyword="alpha")
    cvr_eps: float = constant(1e-6, "CVR variance floor", minimum=0.0, keyword="eps")


@SCORES.register("magnitude", default_group="layer")
def magnitude(W: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """S = |W| (Han et al. 2015), compared over the whole layer."""
    return W.abs()


# The scores below are written as one new [out, in] tensor and in-place ops on it (or on
# chunk-sized scratch, see ``rowpass``): the same arithmetic as the formula in the
# docstring, without a fresh full-size temporary per subexpression.

@SCORES.register("wanda", needs_activations=True, default_group="row")
def wanda(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """S_ij = |W_ij| · ‖x_j‖₂ (Sun et al. 2023, Wanda, eq. 1), compared within each output row."""
    return W.abs().mul_(stats.l2.to(W.device)[None, :])


@SCORES.register("ria", needs_activations=True, default_group="layer", constants=RiaConstants)
def ria(W: torch.Tensor, stats: ActivationStats, *, a: float) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024, RIA, eq. 3):
    S_ij = (|W_ij| / Σ_i|W_ij| + |W_ij| / Σ_j|W_ij|) · ‖x_j‖₂^a, compared over the whole layer.

    An all-zero column or row contributes 0 (not NaN) to its relative term.
    """
    S = W.abs()
    col_sum = S.sum(dim=0, keepdim=True)
    row_sum = S.sum(dim=1, keepdim=True)
    col_sum, row_sum = col_sum.where(col_sum > 0, 1.0), row_sum.where(row_sum > 0, 1.0)
    act = stats.l2.to(W.device).pow(a)[None, :]

    def part(rows: slice, scratch: Scratch) -> None:
        A = S[rows]
        by_row = torch.div(A, row_sum[rows], out=scratch.get(0, A.shape[0]))
        A.div_(col_sum).add_(by_row).mul_(act)

    map_chunks(part, S)
    return S


# Whole-matrix scalars of the Z-Pruner score, as torch computes them on two threads. A
# full reduction in torch depends on its thread count: from GRAIN elements on, each thread
# sums its own contiguous share (cascade sums in float32 for a sum or mean; a sequential
# float64 sum of squared deviations for a std), then the shares are added. The verified
# Table 1 (experiments/quick_table/) was measured on two threads, and the float32 mean of a
# normalised matrix moves in its last bit with the split, which flips some of Z-Pruner's N:M
# choices: SmolLM2 4:8 gives 117.385 on two threads, 118.113 on one. So these scalars are
# always computed as two shares on one thread each: the two-thread results, on any machine
# and any thread count.
_REDUCTION_SHARES = 2
_GRAIN = 32768  # at::internal::GRAIN_SIZE: fewer elements are reduced in one share
# float64 elements per step of a share's sequential sum. Measured (benchmarks/README.md,
# "Z-Pruner's std"): 1 << 18 takes a 576 x 576 std from 3.2 ms to 0.8 ms against 1 << 20
# (two 8 MB buffers per call are fresh pages each time), and a 13824 x 5120 one from 86 ms
# to 97 ms.
_STD_CHUNK = 1 << 18
# Safety factor on _matrix_std's bound between its two sums (the bound is first-order in
# 2⁻⁵³; the second-order terms stay below 0.1 % of it for any matrix under 2⁴⁰ elements)
_STD_SLACK = 1.01


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


def _matrix_mean(X: torch.Tensor) -> torch.Tensor:
    """X.mean() as torch computes it on two threads: Σ of each share's sum, then / n."""
    flat = X.reshape(-1)
    return sum_parts(_over_shares(lambda share: flat[share].sum(), flat.numel())).div_(flat.numel())


def _matrix_std(X: torch.Tensor, mean: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """X.std() (unbiased) as torch computes it on two threads, given ``_matrix_mean(X)``:
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


@SCORES.register("zpruner", needs_activations=True, default_group="row")
def zpruner(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """Z-Pruner importance (Bhuiyan et al. 2025, arXiv 2508.15828, sec. 3):
    z_r, z_c = the row- and the column-L2-normalised W, each standardised over the matrix;
    S = (α·|z_r|³ + (1 − α)·|z_c|³) · ‖x_j‖₂^1.5 with α = 0.7·(1 − 0.3·s), where s is the
    fraction of |W| below 0.1·mean|W| (the paper's sparsity-aware blend).

    Bit for bit the textbook form (the reference in tests/test_fast_paths.py) as torch
    runs it on two threads, on any thread count: the norms are torch's own reductions over
    the whole matrix, the means and stds its two-thread ones (``_matrix_mean``; chunked
    partial sums, as issue 14 had them, moved the verified SmolLM2 4:8 and 2:4 perplexities
    by over 1 %). Each whole-matrix operand is written in turn into the score's own buffer,
    the column-normalised W last, so that the chunked pass that makes the score from it in
    place allocates nothing else full-size.
    """
    W = W.float()
    S = torch.empty_like(W)  # the score in the end; until then each whole-matrix operand in turn

    def abs_and_row_norms(rows: slice, _scratch: Scratch) -> torch.Tensor:
        # |W| and the row norms in one read of W; a row's norm is reduced within the row,
        # so a chunk of rows gives torch's bits for the whole matrix
        torch.abs(W[rows], out=S[rows])
        return W[rows].norm(dim=1, keepdim=True)

    row_norm = torch.cat(map_chunks(abs_and_row_norms, W, 0))
    col_norm = column_norm(W)[None, :]
    row_norm, col_norm = row_norm.where(row_norm > 0, 1.0), col_norm.where(col_norm > 0, 1.0)

    def standardisation(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (unbiased, as torch.std; 1 for a constant matrix) of X."""
        mean = _matrix_mean(X)
        std = _matrix_std(X, mean)
        return mean, std.where(std > 0, 1.0)

    def row_normalised(rows: slice) -> None:
        torch.div(W[rows], row_norm[rows], out=S[rows])

    threshold = 0.1 * _matrix_mean(S)  # S holds |W|
    # (|W| < 0.1·mean|W|).float().mean(); S becomes W / row_norm as it is counted
    small = _fraction_below_(S, threshold, then=row_normalised)
    if small is None:  # the count needs |W| as floats
        small = _fraction_below_(torch.abs(W, out=S), threshold)
        torch.div(W, row_norm, out=S)
    alpha = 0.7 * (1 - 0.3 * small)
    mean_r, std_r = standardisation(S)
    mean_c, std_c = standardisation(torch.div(W, col_norm, out=S))  # S holds W / col_norm from here on
    act = stats.l2.to(W.device).pow(1.5)[None, :]
    kernel = _score_kernel(W, S, row_norm, act)
    if kernel is not None:
        blend = [float(v) for v in (mean_r, std_r, mean_c, std_c, alpha, 1 - alpha)]

    def score(rows: slice, scratch: Scratch) -> None:
        if kernel is not None:
            kernel.zpruner_score(W[rows].data_ptr(), W.stride(0), S[rows].data_ptr(), S.stride(0),
                                 row_norm[rows].data_ptr(), act.data_ptr(), *blend, rows.stop - rows.start, W.shape[1])
            return
        block = W[rows]
        z_r = torch.div(block, row_norm[rows], out=scratch.get(0, block.shape[0])).sub_(mean_r).div_(std_r)
        z_c = S[rows].sub_(mean_c).div_(std_c)
        z_r.abs_().pow_(3).mul_(alpha)
        z_c.abs_().pow_(3).mul_(1 - alpha)
        z_c.add_(z_r).mul_(act)

    map_chunks(score, W)
    return S


_KERNEL = ("zpruner_kernel", (
    ("zpruner_score", (native.POINTER, native.INT64, native.POINTER, native.INT64, native.POINTER, native.POINTER,
                       *(native.FLOAT,) * 6, native.INT64, native.INT64)),
    ("sum_squared_deviations", (native.POINTER, native.INT64, native.DOUBLE), native.DOUBLE),
    ("count_below", (native.POINTER, native.INT64, native.FLOAT), native.INT64),
))


def _reduction_kernel(X: torch.Tensor):
    """The compiled reductions of ``zpruner_kernel.c`` for a contiguous float32 CPU matrix
    (any size: their results are exact, or decided by a bound that holds in any order)."""
    return native.load(*_KERNEL) if native.fits(X) else None


def _score_kernel(W: torch.Tensor, S: torch.Tensor, row_norm: torch.Tensor, act: torch.Tensor):
    """The compiled score pass (``zpruner_kernel.c``: the eager pass's bits, one read of each
    weight) for CPU float32 matrices over a chunk, as EC's kernel (``updates.ec_kernel``);
    None elsewhere (GPU, other dtypes, every SmolLM2 layer) or when it does not build."""
    applies = (W.numel() > rowpass.CHUNK_ELEMENTS and native.fits(W, S, layout="rows")
               and native.fits(row_norm, act))
    return native.load(*_KERNEL) if applies else None


_EXACT_COUNT = 1 << 24  # float32 holds every integer below this


def _fraction_below_(X: torch.Tensor, threshold: torch.Tensor,
                     then: Callable[[slice], object] | None = None) -> torch.Tensor | None:
    """(X < threshold).float().mean() for X [out, in] as ``_matrix_mean`` computes it, mostly
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
        return None if then is not None else _matrix_mean(torch.lt(X, threshold, out=X))
    parts = [torch.tensor(float(count), dtype=torch.float32, device=X.device) for count in counts]
    return sum_parts(parts).div_(flat.numel())


@SCORES.register("cvr", needs_activations=True, default_group="row", constants=CvrConstants)
def cvr(W: torch.Tensor, stats: ActivationStats, *, alpha: float, eps: float) -> torch.Tensor:
    """Variance-calibrated importance (statistical-correction paper, "CVR"):
    S_ij = |W_ij| · a_j · c_j with a_j = Var(x_j)^(1/4), the spread of input j over the
    calibration tokens, and c_j = (Var_i W_ij + ε)^(−α/2), which discounts columns whose
    weights vary widely across outputs. Compared within each output row.
    """
    a = stats.var.to(W.device).pow(0.25)
    c = (column_variance(W) + eps).pow(-alpha / 2)
    return W.abs().mul_((a * c)[None, :])
