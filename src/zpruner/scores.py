"""Importance scores: pure functions ``score(W, stats) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered with the statistics it needs and
its default comparison group; a new method is one decorated function here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .stats import ActivationStats

ScoreFn = Callable[[torch.Tensor, "ActivationStats | None"], torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    fn: ScoreFn
    needs_activations: bool
    default_group: str  # 'row' or 'layer': where unstructured masks compare scores


SCORES: dict[str, Score] = {}


def register(name: str, *, needs_activations: bool, default_group: str) -> Callable[[ScoreFn], ScoreFn]:
    def wrap(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = Score(name, fn, needs_activations, default_group)
        return fn

    return wrap


def get_score(name: str) -> Score:
    try:
        return SCORES[name]
    except KeyError:
        raise ZprunerError(f"method '{name}' is unknown; choose one of {', '.join(SCORES)}") from None


@register("magnitude", needs_activations=False, default_group="layer")
def magnitude(W: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """S = |W| (Han et al. 2015), compared over the whole layer."""
    return W.abs()


@register("wanda", needs_activations=True, default_group="row")
def wanda(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """S_ij = |W_ij| · ‖x_j‖₂ (Sun et al. 2023, Wanda, eq. 1), compared within each output row."""
    return W.abs() * stats.l2.to(W.device)[None, :]
