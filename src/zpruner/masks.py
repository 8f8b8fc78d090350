"""Masks: pure functions of a score. Convention everywhere: ``keep`` is bool, True = kept.

Per-layer, per-row and N:M selection are one operation, "drop the k lowest scores of
every row" (top-k), applied to three views of the score matrix. It runs as
``zpruner.kernels.selection.drop_lowest``: the same masks without top-k's whole-matrix
buffers, and a whole layer without a top-k at all.
"""
from __future__ import annotations

import math

import torch

from .errors import ZprunerError
from .kernels import selection
from .patterns import Pattern, check_sparsity  # noqa: F401 (re-exported: masks speak of patterns)


def drop_lowest_by_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """keep: [rows, cols] with exactly ``k`` False in every row, at its ``k`` lowest scores,
    as top-k finds them (NaN counts as the highest; among tied scores top-k's own choice)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False, sorted=False).indices, False)
    return keep


def drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """keep: [rows, cols] with exactly ``k`` False in every row, at its ``k`` lowest scores.

    Computed by ``kernels.selection.drop_lowest`` everywhere: ``drop_lowest_by_topk``'s
    mask, ties at the cut included, except in a row of ``selection.TIES_BY_INDEX_MIN``
    scores or more (a whole large layer), whose scores tied at the cut go lowest index
    first: top-k's buffers would cost gigabytes there."""
    return selection.drop_lowest(score, k)


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
