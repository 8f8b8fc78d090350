"""RIA channel reallocation for N:M (Zhang et al. 2024, sec. 3.3): reorder a layer's input
channels so that its N:M mask keeps more of the score.

An N:M mask only compares weights within groups of M consecutive inputs, so which
channels share a group decides what can be kept. A permutation ``perm`` (new column k =
old column perm[k]) is found by RIA's heuristic, dealing channels sorted by total score
out across groups, then refined by linear-sum assignment one in-group position at a time.
The pure functions here only choose ``perm``; ``pruning.py`` applies it to the model
where that is exact (see ``permute_inputs``).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .masks import drop_lowest


def nm_retained(score: torch.Tensor, n: int, m: int) -> float:
    """Sum of the scores an N:M mask keeps (n lowest of every m consecutive dropped)."""
    groups = score.reshape(-1, m)
    return (groups * drop_lowest(groups, n)).sum().item()


def heuristic_permutation(score: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's reallocation: channels sorted by total score are cut into m bands; group g
    takes the g-th channel of each band, bands read in alternating directions so each
    group mixes weak and strong channels."""
    d_in = score.shape[1]
    order = torch.argsort(score.sum(dim=0))
    perm = torch.empty_like(order)
    bands = order.reshape(m, d_in // m)
    for b in range(m):
        perm[b::m] = bands[b].flip(0) if b % 2 else bands[b]
    return perm


def _assignment_gain(score: torch.Tensor, perm: torch.Tensor, n: int, m: int, position: int, chunk: int = 32):
    """gain[c, g]: score group g keeps if candidate c (the channel now at ``position`` of
    group c) sits at ``position`` of group g, the group's other m-1 channels fixed.

    With K = m-n kept per group and the others sorted per row o_1 >= ... >= o_{m-1}, a
    row keeps o_1 + ... + o_{K-1} + max(candidate, o_K)."""
    S = score[:, perm].reshape(score.shape[0], -1, m)  # [out, groups, m]
    others = torch.cat([S[:, :, :position], S[:, :, position + 1:]], dim=2).sort(dim=2, descending=True).values
    keep = m - n
    fixed = others[:, :, : keep - 1].sum(dim=(0, 2))  # [groups]
    threshold = others[:, :, keep - 1]  # [out, groups]
    candidates = S[:, :, position]  # [out, candidates]
    gain = torch.empty(candidates.shape[1], candidates.shape[1], dtype=torch.float64)
    for c0 in range(0, candidates.shape[1], chunk):
        cand = candidates[:, c0:c0 + chunk]  # [out, c]
        gain[c0:c0 + chunk] = torch.maximum(cand.t()[:, None, :], threshold.t()[None]).sum(dim=2).double()
    return gain + fixed.double()[None, :]


def lsa_refine(score: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """For each in-group position, move that position's channels between groups by an
    optimal linear-sum assignment of the retained score (RIA's refinement)."""
    perm = perm.clone()
    for position in range(m):
        gain = _assignment_gain(score, perm, n, m, position)
        candidates, groups = linear_sum_assignment(gain.numpy(), maximize=True)
        moved = perm[position::m].clone()
        perm[position + m * torch.as_tensor(groups)] = moved[torch.as_tensor(candidates)]
    return perm


def best_permutation(score: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor | None, float, float]:
    """(perm or None, retained score without, with it): None when reallocation keeps no
    more than the plain N:M mask in the original order."""
    score = score.float()
    plain = nm_retained(score, n, m)
    perm = lsa_refine(score, heuristic_permutation(score, m), n, m)
    realloc = nm_retained(score[:, perm], n, m)
    return (perm if realloc > plain else None), plain, realloc
