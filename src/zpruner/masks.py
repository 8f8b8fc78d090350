"""Masks: pure functions of a score. Convention everywhere: ``keep`` is bool, True = kept.

Per-layer, per-row and N:M selection are one operation, "drop the k lowest scores of
every row", applied to three views of the score matrix.
"""
from __future__ import annotations

import math

import torch

from . import native
from .errors import ZprunerError
from .patterns import Pattern, check_sparsity  # noqa: F401 (re-exported: masks speak of patterns)
from .rowpass import map_chunks, map_threads


# Below this many scores a single row is selected by top-k: the threshold search only pays
# off once a full selection costs more than its few passes (measured: 26 M scores, top-k
# 0.64 s against about 0.1 s; at 64 K both are well under a millisecond).
THRESHOLD_SEARCH_MIN = 1 << 16
SAMPLE_SIZE = 1 << 16
_SAMPLE_SEED = 0x5A9E  # fixed: the same scores always give the same mask
# From this many scores on, a row whose k-th lowest score is tied across the cut drops the
# tied scores in index order instead of going to top-k. Top-k over n scores holds an
# n-long buffer of (value, index) pairs, 16 bytes a score, and its k results: 1.5 GB above
# the scores and 10 times the threshold search's time for a LLaMA-2-13B MLP projection
# (benchmarks/selection_memory.py), about 5 GB for a 70B one. On bfloat16 or dequantized
# weights magnitude's cut is nearly always tied, which made magnitude 2.8-4.8x Wanda on
# 13B shapes. Which of the tied scores go is arbitrary either way (nothing in the scores
# tells them apart); below this size top-k's choice stays, so every smaller layer (all of
# SmolLM2's: 0.9 M weights at most, and SparseGPT's column blocks up to 28672 outputs)
# keeps its mask and the verified results theirs (index order moved SmolLM2's magnitude
# 50 % from 519.77 to 513.98).
TIES_BY_INDEX_MIN = 1 << 22


def drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """keep: [rows, cols] with exactly ``k`` False in every row, at its ``k`` lowest scores.

    One long row (a whole layer viewed as [1, out·in]) is selected by a threshold search
    instead of a top-k over every score, with the same result up to ties: when the k-th
    score is tied across the cut, top-k still decides on rows shorter than
    ``TIES_BY_INDEX_MIN``, and the tied scores of lower index go first on longer ones.
    """
    n = score.shape[1]
    if score.shape[0] == 1 and n >= THRESHOLD_SEARCH_MIN and 0 < k < n:
        keep = _drop_lowest_flat(score.reshape(-1), k, ties_by_index=n >= TIES_BY_INDEX_MIN)
        if keep is not None:
            return keep.reshape(score.shape)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        # Top-k chunk by chunk of rows: a row's choice does not depend on the other rows,
        # and the (value, index) pairs of a whole layer (12 bytes a score, 0.85 GB for a
        # LLaMA-2-13B MLP projection at 50 %) would come as fresh zero-filled pages
        # (rowpass's docstring) while a chunk's are reused from the allocator.
        def drop(rows: slice, _scratch) -> None:
            keep[rows].scatter_(1, torch.topk(score[rows], k, dim=1, largest=False, sorted=False).indices, False)

        map_chunks(drop, score, 0)
    return keep


def drop_lowest_set(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """keep: [n] with False at the k lowest of ``flat`` when they are a set of values,
    the same whatever the order of ``flat`` (no score equal to the k-th lowest is kept);
    None when that is not so, or not checked on so few scores: then
    ``drop_lowest`` of the scores in their own order decides, as top-k breaks ties."""
    n = flat.numel()
    if k == 0 or k == n:
        return torch.full_like(flat, k == 0, dtype=torch.bool)
    if n < THRESHOLD_SEARCH_MIN or not 0 < k < n:
        return None
    return _drop_lowest_flat(flat, k)


def _drop_lowest_flat(flat: torch.Tensor, k: int, ties_by_index: bool = False) -> torch.Tensor | None:
    """keep: [n] with exactly ``k`` False at the k lowest of ``flat``, or None when the
    sampled bracket missed or the k-th lowest score is tied across the cut and not
    ``ties_by_index`` (then the caller falls back to top-k). With ``ties_by_index``, the
    tied scores that are to go are the first ones in index order.

    The k-th lowest value t is bracketed by quantiles of a random sample, so only the
    scores inside the bracket (a few percent) are selected exactly; the rest is a few
    comparisons and a count over the scores. Everything up to t is dropped.
    """
    n = flat.numel()
    m = min(SAMPLE_SIZE, n)
    gen = torch.Generator(device=flat.device).manual_seed(_SAMPLE_SEED)
    sample = flat[torch.randint(n, (m,), generator=gen, device=flat.device)]
    # The sample rank of t is binomial around k·m/n; 8 standard deviations (plus a
    # little) put t outside the bracket with probability far below 1e-12.
    q = k / n
    centre = q * m
    spread = 8.0 * math.sqrt(max(m * q * (1 - q), 1.0)) + 2
    lo_rank = max(1, math.floor(centre - spread))
    hi_rank = min(m, math.ceil(centre + spread))
    lo = sample.kthvalue(lo_rank).values if centre - spread > 1 else flat.new_tensor(-math.inf)
    hi = sample.kthvalue(hi_rank).values if centre + spread < m else flat.new_tensor(math.inf)
    kernel = _select_kernel(flat)
    if kernel is not None:
        return _select_compiled(kernel, flat, k, float(lo), float(hi), ties_by_index)
    # NaN compares false everywhere: it is neither below nor inside the bracket, and
    # "not <= t" keeps it, as top-k (which ranks NaN highest) does
    below = int(torch.count_nonzero(flat < lo))
    candidates = flat[(flat >= lo).logical_and_(flat <= hi)]
    rank = k - below  # rank of t among the candidates, 1-based
    if not 0 < rank <= candidates.numel():
        return None
    t = candidates.kthvalue(rank).values
    tied_to_drop = k - below - int(torch.count_nonzero(candidates < t))
    cut_is_tied = tied_to_drop < int(torch.count_nonzero(candidates == t))
    if cut_is_tied and not ties_by_index:
        # Only some of the scores equal to t are to go. Top-k's choice among them depends
        # on its algorithm, and it matters: dequantized weights tie by the dozen at the
        # threshold, and another choice moved SmolLM2's magnitude-50 % perplexity from
        # 519.77 to 513.98. So top-k decides unless the row is long (TIES_BY_INDEX_MIN).
        return None
    keep = (flat <= t).logical_not_()
    if cut_is_tied:
        keep[torch.nonzero(flat == t).reshape(-1)[tied_to_drop:]] = True
    return keep


_KERNEL = ("select_kernel", (
    ("select_count", (native.POINTER, native.INT64, native.FLOAT, native.FLOAT, native.POINTER)),
    ("select_gather", (native.POINTER, native.INT64, native.FLOAT, native.FLOAT, native.POINTER)),
    ("select_keep", (native.POINTER, native.INT64, native.FLOAT, native.INT64, native.POINTER)),
))
_RANGE = 1 << 20  # scores per piece of work on a thread


def _select_kernel(flat: torch.Tensor):
    """The compiled passes (``select_kernel.c``) for contiguous float32 CPU scores, else None."""
    return native.load(*_KERNEL) if native.fits(flat) else None


def _select_compiled(kernel, flat: torch.Tensor, k: int, lo: float, hi: float, ties_by_index: bool):
    """The passes of ``_drop_lowest_flat`` after its bracket [lo, hi], one loop each over
    ranges of the scores on the worker threads: the same comparisons, so the same mask,
    without the bool temporaries of the torch passes (measured in benchmarks/README.md)."""
    n = flat.numel()
    ranges = [(a, min(a + _RANGE, n)) for a in range(0, n, _RANGE)]
    pointer, size = flat.data_ptr(), flat.element_size()

    def each_range(call) -> None:
        """call(i, address of range i's first score, its length) for every range, on the workers."""
        map_threads(lambda i: call(i, pointer + ranges[i][0] * size, ranges[i][1] - ranges[i][0]),
                    list(range(len(ranges))))

    counts = torch.zeros(len(ranges), 2, dtype=torch.int64)
    each_range(lambda i, x, length: kernel.select_count(x, length, lo, hi, counts[i].data_ptr()))
    below = int(counts[:, 0].sum())
    ends = counts[:, 1].cumsum(0).tolist()  # where each range's candidates end
    rank = k - below  # rank of t among the candidates, 1-based
    if not 0 < rank <= ends[-1]:
        return None
    candidates = torch.empty(ends[-1], dtype=flat.dtype)
    starts = [0, *ends[:-1]]
    each_range(lambda i, x, length: kernel.select_gather(x, length, lo, hi, candidates[starts[i]:].data_ptr()))
    t = candidates.kthvalue(rank).values
    tied = candidates == t
    tied_to_drop = rank - int(torch.count_nonzero(candidates < t))
    if tied_to_drop < int(torch.count_nonzero(tied)) and not ties_by_index:
        return None  # as in _drop_lowest_flat: top-k decides a tie at the cut
    ties_before = torch.cat([tied.new_zeros(1, dtype=torch.int64), tied.cumsum(0)])[[*starts, ends[-1]]].tolist()
    # each range drops its ties while the layer's count lasts; -1: all of them
    drops = [-1 if tied_to_drop >= ties_before[i + 1] else max(0, tied_to_drop - ties_before[i])
             for i in range(len(ranges))]
    keep = torch.empty(n, dtype=torch.bool)
    threshold = float(t)
    each_range(lambda i, x, length: kernel.select_keep(x, length, threshold, drops[i], keep[ranges[i][0]:].data_ptr()))
    return keep


def n_pruned(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a ``sparsity`` removes (floor, robust to float error)."""
    return math.floor(sparsity * size + 1e-9)


def keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """keep: [out, in] for score S: [out, in].

    unstructured: exactly floor(sparsity·in) zeros per row (group 'row') or
    floor(sparsity·out·in) in the layer (group 'layer'). N:M: exactly N zeros in every
    M consecutive inputs of each row; ``sparsity`` is ignored (it is N/M).
    """
    d_out, d_in = score.shape
    if pattern.is_nm:
        if d_in % pattern.m:
            raise ZprunerError(f"pattern {pattern} needs an input size divisible by {pattern.m}, got {d_in}")
        groups = score.reshape(-1, pattern.m)
        return drop_lowest(groups, pattern.n).reshape(d_out, d_in)
    if group == "row":
        return drop_lowest(score, n_pruned(sparsity, d_in))
    if group == "layer":
        return drop_lowest(score.reshape(1, -1), n_pruned(sparsity, score.numel())).reshape(d_out, d_in)
    raise ZprunerError(f"comparison group '{group}' is unknown; choose 'row' or 'layer'")
