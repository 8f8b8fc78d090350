"""Importance scores: pure functions ``score(W, stats, **constants) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered (``zpruner.registry``) with the
statistics it needs, its default comparison group and the dataclass of its constants; a new
method is one decorated function here or in a module of its own. SparseGPT is the one
method that is not a score: it chooses its mask inside its reconstruction (a solver, see
``sparsegpt.py``).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import ZprunerError
from .registry import SCORES, Method, constant, get_method
from . import rowpass
from .rowpass import Scratch, map_chunks, map_threads, sum_parts
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


def _matrix_std(X: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """X.std() (unbiased) as torch computes it on two threads, given ``_matrix_mean(X)``:
    Σ (x − mean)² in float64, sequentially within each share, the shares added in order."""
    flat = X.reshape(-1)
    m = float(mean)
    shares = _shares(flat.numel())
    step = min(_STD_CHUNK, max(share.stop - share.start for share in shares))

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

    total = sum_parts(_over_shares(sequential_sum, flat.numel(), shares))
    var = total / max(0.0, flat.numel() - 1)
    return torch.tensor(math.sqrt(var), dtype=torch.float64).to(device=X.device, dtype=torch.float32)


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
    row_norm = W.norm(dim=1, keepdim=True)
    col_norm = column_norm(W)[None, :]
    row_norm, col_norm = row_norm.where(row_norm > 0, 1.0), col_norm.where(col_norm > 0, 1.0)
    S = torch.empty_like(W)  # the score in the end; until then each whole-matrix operand in turn

    def standardisation(norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (unbiased, as torch.std; 1 for a constant matrix) of W / norm."""
        X = torch.div(W, norm, out=S)
        mean = _matrix_mean(X)
        std = _matrix_std(X, mean)
        return mean, std.where(std > 0, 1.0)

    A = torch.abs(W, out=S)
    small = _fraction_below_(A, 0.1 * _matrix_mean(A))  # (A < 0.1·mean|A|).float().mean()
    alpha = 0.7 * (1 - 0.3 * small)
    mean_r, std_r = standardisation(row_norm)
    mean_c, std_c = standardisation(col_norm)  # S holds W / col_norm from here on
    act = stats.l2.to(W.device).pow(1.5)[None, :]

    def score(rows: slice, scratch: Scratch) -> None:
        block = W[rows]
        z_r = torch.div(block, row_norm[rows], out=scratch.get(0, block.shape[0])).sub_(mean_r).div_(std_r)
        z_c = S[rows].sub_(mean_c).div_(std_c)
        z_r.abs_().pow_(3).mul_(alpha)
        z_c.abs_().pow_(3).mul_(1 - alpha)
        z_c.add_(z_r).mul_(act)

    map_chunks(score, W)
    return S


_EXACT_COUNT = 1 << 24  # float32 holds every integer below this


def _fraction_below_(X: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(X < threshold).float().mean() as ``_matrix_mean`` computes it, mostly without the
    float matrix: a share's float32 sum of ones is its count exactly while the count is
    below 2²⁴ (every partial sum is then an integer float32 holds). Above, the ones are
    written into X itself and summed as they are. A share is counted a chunk at a time:
    the comparison's bool temporary then comes from the allocator's free lists, not as
    fresh pages (rowpass's docstring)."""
    flat = X.reshape(-1)
    step = rowpass.CHUNK_ELEMENTS

    def count(share: slice) -> int:
        return sum(int(torch.count_nonzero(flat[a:min(a + step, share.stop)] < threshold))
                   for a in range(share.start, share.stop, step))

    counts = _over_shares(count, flat.numel())
    if max(counts) >= _EXACT_COUNT:
        return _matrix_mean(torch.lt(X, threshold, out=X))
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


def column_variance(W: torch.Tensor) -> torch.Tensor:
    """Var_i W_ij over the rows (population variance): [in], the bits of torch's
    ``W.var(dim=0, unbiased=False)``, 2 to 3 times faster on a large float32 CPU matrix
    (``benchmarks/column_reductions.py``).

    Torch's CPU kernel runs Welford's recurrence in float64, one element at a time, and
    rounds the result to float32 once. One pass over row chunks in float64 gives Σx and
    Σx², and Σx² − (Σx)²/n lands within (3n + 5)·2⁻⁵³·Σx² of the exact centred energy
    (each term is within n·2⁻⁵³·Σx², as |Σx| ≤ sqrt(n·Σx²)). Where that bound is below
    1e-10 of the energy (a column whose mean is not large against its spread: all of
    SmolLM2's), the variance rounds to the same float32 as torch's except where the
    exact value lies next to the middle between two float32s; such columns, and those with
    a larger bound, are taken from torch's kernel itself. A float32 formula moved the
    SmolLM2 CVR 50 % cell from 81.951 to 81.870 (issue 14), and verified results stay as
    they are. Elsewhere torch's own kernel: on a GPU or another dtype it accumulates
    otherwise, and for a single column it takes another path.
    """
    if W.device.type != "cpu" or W.dtype != torch.float32 or W.shape[1] < 2:
        return W.var(dim=0, unbiased=False)
    n = W.shape[0]

    def moments(rows: slice, _scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
        block = W[rows].double()
        return block.sum(0), block.square_().sum(0)

    parts = map_chunks(moments, W, 0)
    total = sum(part[0] for part in parts)
    squares = sum(part[1] for part in parts)
    energy = squares - total * total / n
    variance = energy / n
    error_bound = (3 * n + 5) * 2.0**-53 * squares / energy  # relative to the energy
    # torch's Welford result is within a few float64 ulps of the exact value too; 1e-9
    # leaves a wide margin and sends 2.3 % of SmolLM2's columns to torch
    near_a_tie = (variance * (1 + 1e-9)).float() != (variance * (1 - 1e-9)).float()
    near_a_tie |= ~((energy > 0) & (error_bound < 1e-10))  # also a column with no spread
    variance = variance.float()
    if near_a_tie.any():
        # two columns at least: torch reduces a lone column another way
        columns = torch.cat([near_a_tie.nonzero().flatten(), torch.tensor([0, 1])])
        variance[columns] = W[:, columns].var(dim=0, unbiased=False)
    return variance
