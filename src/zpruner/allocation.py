"""How the target sparsity is shared out among the decoder blocks (``--allocation``).

'uniform' gives every block the target. 'owl' is outlier-weighted layer-wise sparsity (Yin
et al. 2023, "Outlier Weighed Layerwise Sparsity"): a block whose weights carry more
outliers, |W|·‖x‖ above ``owl_m`` times the block's mean (Wanda's score on the dense model,
whatever method then prunes), is pruned less. As OWL's code does it, the outlier fractions
D_b are mapped linearly onto [0, 2λ] and block b gets s_b = s + mean(·) − its value, so the
average is s; zpruner then clips to [s − λ, s + λ] (the paper's stated range, which that
formula can leave when the fractions are skewed) and shifts the whole profile until the
size-weighted average is exactly s again. Blocks are weighted by their prunable weights, so
the model's overall sparsity is the target, counted from the weights.

N:M: a block's pattern is N_b:M with N_b = N + its offset (s_b − s)·M rounded to whole N,
the way OWL's code derives mixed N:M (an offset of the block's N, centred, rounded); zpruner
rounds so the offsets sum to zero (largest remainders), keeping the model at N/M exactly
when blocks have equal size (every decoder-only family), and keeps 1 <= N_b <= M − 1.
With λ·M below 1/2 (e.g. 2:4 at λ = 0.08) most blocks keep N.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .masks import Pattern
from .registry import ALLOCATIONS, constant
from .scores import wanda

# survey(measure) -> (measure of every block, prunable weights of every block)
Survey = Callable[[Callable[[dict, dict], float]], tuple[list[float], list[int]]]


def outlier_fraction(weights: dict[str, torch.Tensor], stats: dict, m: float) -> float:
    """Fraction of a block's weights whose Wanda score |W|·‖x‖ exceeds ``m`` × the block's
    mean score (all its linear layers together, as OWL counts)."""
    # Two passes, each layer's score made anew: holding every layer's scores at once would
    # cost a float32 copy of the whole block, which streaming a large model cannot afford.
    def scores():
        for name, W in weights.items():
            yield wanda(W.float(), stats[name])

    total = sum(W.numel() for W in weights.values())
    mean = sum(float(S.sum()) for S in scores()) / total
    return sum(int((S > m * mean).sum()) for S in scores()) / total


def _weighted_mean(values: torch.Tensor, sizes: torch.Tensor) -> float:
    return float((values * sizes).sum() / sizes.sum())


def centred_in_range(raw: Sequence[float], sizes: Sequence[int], target: float, lo: float, hi: float) -> list[float]:
    """``raw`` shifted by one constant t and clipped to [lo, hi] so that its size-weighted
    mean is ``target`` (t found by bisection; the mean is monotone in t)."""
    r = torch.tensor(raw, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    low, high = lo - float(r.max()), hi - float(r.min())
    for _ in range(200):
        t = (low + high) / 2
        if _weighted_mean((r + t).clamp(lo, hi), w) < target:
            low = t
        else:
            high = t
    return (r + (low + high) / 2).clamp(lo, hi).tolist()


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float,
                   lo: float = 0.0, hi: float = 1.0 - 1e-6) -> list[float]:
    """Per-block sparsities from the blocks' outlier fractions: within ±``lam`` of
    ``target`` (and [lo, hi]), size-weighted mean ``target``, fewer zeros where more outliers."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if lam == 0 or spread == 0:
        return [target] * len(ratios)
    mapped = (r - r.min()) / spread * 2 * lam
    raw = target + _weighted_mean(mapped, torch.tensor(sizes, dtype=torch.float64)) - mapped
    return centred_in_range(raw.tolist(), sizes, target, max(lo, target - lam), min(hi, target + lam))


def round_to_zero_sum(offsets: Sequence[float]) -> list[int]:
    """Integers, each the floor or ceiling of its offset, summing to round(Σ offsets): the
    largest fractional parts are rounded up."""
    floors = [math.floor(o) for o in offsets]
    up = round(sum(offsets)) - sum(floors)
    order = sorted(range(len(offsets)), key=lambda i: offsets[i] - floors[i], reverse=True)
    for i in order[:max(up, 0)]:
        floors[i] += 1
    return floors


def nm_sparsities(sparsities: Sequence[float], pattern: Pattern) -> list[float]:
    """Per-block N_b/M from per-block sparsities around N/M (see the module docstring)."""
    target = pattern.n / pattern.m
    steps = round_to_zero_sum([(s - target) * pattern.m for s in sparsities])
    return [(pattern.n + k) / pattern.m for k in steps]


@ALLOCATIONS.register("uniform")
def uniform(survey: Survey, *, sparsity: float, pattern: Pattern) -> list[float] | None:
    """Every block at the target: nothing to measure (None: no per-block list)."""
    return None


@dataclass(frozen=True, kw_only=True)
class OWLConstants:
    # defaults: the paper's (M = 5, λ = 0.08 for LLaMA at 70 %)
    owl_m: float = constant(5.0, "OWL: an outlier weight has |W|·‖x‖ above M times its block's mean", minimum=0.0,
                            strict=True)
    owl_lambda: float = constant(0.08, "OWL: a block's sparsity stays within ±λ of the target", minimum=0.0)


@ALLOCATIONS.register("owl", needs_activations=True, constants=OWLConstants)
def owl(survey: Survey, *, sparsity: float, pattern: Pattern, owl_m: float, owl_lambda: float) -> list[float]:
    """Outlier-weighted sparsity per block, from one pass of the dense model."""
    ratios, sizes = survey(lambda weights, stats: outlier_fraction(weights, stats, owl_m))
    if pattern.is_nm:
        edge = 1 / pattern.m  # 1 <= N_b <= M - 1
        return nm_sparsities(owl_sparsities(ratios, sizes, sparsity, owl_lambda, edge, 1 - edge), pattern)
    return owl_sparsities(ratios, sizes, sparsity, owl_lambda)
