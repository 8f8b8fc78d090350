"""Importance scores: pure functions ``score(W, stats, **options) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered with the statistics it needs, its
default comparison group and the ``PruneConfig`` fields that feed its keyword options;
a new method is one decorated function here. SparseGPT is the one method that is not a
score: it chooses its mask inside its reconstruction (``SOLVERS``, see ``sparsegpt.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ZprunerError
from .stats import ActivationStats

ScoreFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    fn: ScoreFn
    needs_activations: bool
    default_group: str  # 'row' or 'layer': where unstructured masks compare scores
    options: Mapping[str, str] = field(default_factory=dict)  # fn keyword -> PruneConfig field

    def __call__(self, W: torch.Tensor, stats: ActivationStats | None, config: Any) -> torch.Tensor:
        return self.fn(W, stats, **{kw: getattr(config, attr) for kw, attr in self.options.items()})


SCORES: dict[str, Score] = {}
SOLVERS = ("sparsegpt",)  # methods whose mask is chosen inside a reconstruction


def register(
    name: str, *, needs_activations: bool, default_group: str, options: Mapping[str, str] | None = None
) -> Callable[[ScoreFn], ScoreFn]:
    def wrap(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = Score(name, fn, needs_activations, default_group, dict(options or {}))
        return fn

    return wrap


def method_names() -> list[str]:
    return [*SCORES, *SOLVERS]


def check_method(name: str) -> None:
    if name not in SCORES and name not in SOLVERS:
        raise ZprunerError(f"method '{name}' is unknown; choose one of {', '.join(method_names())}")


def get_score(name: str) -> Score:
    check_method(name)
    if name not in SCORES:
        raise ZprunerError(f"method '{name}' chooses its mask inside its solver and has no score")
    return SCORES[name]


@register("magnitude", needs_activations=False, default_group="layer")
def magnitude(W: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """S = |W| (Han et al. 2015), compared over the whole layer."""
    return W.abs()


@register("wanda", needs_activations=True, default_group="row")
def wanda(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """S_ij = |W_ij| · ‖x_j‖₂ (Sun et al. 2023, Wanda, eq. 1), compared within each output row."""
    return W.abs() * stats.l2.to(W.device)[None, :]


@register("ria", needs_activations=True, default_group="layer", options={"a": "ria_exponent"})
def ria(W: torch.Tensor, stats: ActivationStats, *, a: float) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024, RIA, eq. 3):
    S_ij = (|W_ij| / Σ_i|W_ij| + |W_ij| / Σ_j|W_ij|) · ‖x_j‖₂^a, compared over the whole layer.

    An all-zero column or row contributes 0 (not NaN) to its relative term.
    """
    A = W.abs()
    col_sum = A.sum(dim=0, keepdim=True)
    row_sum = A.sum(dim=1, keepdim=True)
    relative = A / col_sum.where(col_sum > 0, 1.0) + A / row_sum.where(row_sum > 0, 1.0)
    return relative * stats.l2.to(W.device).pow(a)[None, :]


def _standardised(X: torch.Tensor) -> torch.Tensor:
    """(X - mean) / std over the whole matrix (unbiased std, as torch.std)."""
    std = X.std()
    return (X - X.mean()) / std.where(std > 0, 1.0)


@register("zpruner", needs_activations=True, default_group="row")
def zpruner(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """Z-Pruner importance (Bhuiyan et al. 2025, arXiv 2508.15828, sec. 3):
    z_r, z_c = the row- and the column-L2-normalised W, each standardised over the matrix;
    S = (α·|z_r|³ + (1 − α)·|z_c|³) · ‖x_j‖₂^1.5 with α = 0.7·(1 − 0.3·s), where s is the
    fraction of |W| below 0.1·mean|W| (the paper's sparsity-aware blend).
    """
    A = W.abs()
    row_norm = W.norm(dim=1, keepdim=True)
    col_norm = W.norm(dim=0, keepdim=True)
    z_row = _standardised(W / row_norm.where(row_norm > 0, 1.0))
    z_col = _standardised(W / col_norm.where(col_norm > 0, 1.0))
    small = (A < 0.1 * A.mean()).float().mean()
    alpha = 0.7 * (1 - 0.3 * small)
    importance = alpha * z_row.abs().pow(3) + (1 - alpha) * z_col.abs().pow(3)
    return importance * stats.l2.to(W.device).pow(1.5)[None, :]


@register("cvr", needs_activations=True, default_group="row", options={"alpha": "cvr_alpha", "eps": "cvr_eps"})
def cvr(W: torch.Tensor, stats: ActivationStats, *, alpha: float, eps: float) -> torch.Tensor:
    """Variance-calibrated importance (statistical-correction paper, "CVR"):
    S_ij = |W_ij| · a_j · c_j with a_j = Var(x_j)^(1/4), the spread of input j over the
    calibration tokens, and c_j = (Var_i W_ij + ε)^(−α/2), which discounts columns whose
    weights vary widely across outputs. Compared within each output row.
    """
    a = stats.var.to(W.device).pow(0.25)
    c = (W.var(dim=0, unbiased=False) + eps).pow(-alpha / 2)
    return W.abs() * (a * c)[None, :]
