"""Importance scores: pure functions ``score(W, stats, **constants) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered (``zpruner.registry``) with the
statistics it needs, its default comparison group and the dataclass of its constants; a new
method is one decorated function here or in a module of its own. SparseGPT is the one
method that is not a score: it chooses its mask inside its reconstruction (a solver, see
``sparsegpt.py``).

Each function here is its paper's formula as whole-matrix torch expressions. RIA, Z-Pruner
and CVR run as faster versions with the formula's bits (``zpruner.kernels.score_passes``,
attached to their registered methods); tests/test_fast_paths.py holds them to these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .registry import SCORES, Method, constant, get_method
from .stats import ActivationStats


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


@SCORES.register("wanda", needs_activations=True, default_group="row")
def wanda(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """S_ij = |W_ij| · ‖x_j‖₂ (Sun et al. 2023, Wanda, eq. 1), compared within each output row."""
    # in place on the new |W|: the product's bits without a second [out, in] tensor
    return W.abs().mul_(stats.l2.to(W.device)[None, :])


@SCORES.register("ria", needs_activations=True, default_group="layer", constants=RiaConstants)
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
    """(X − mean) / std over the whole matrix (unbiased std, as torch.std; 1 for a constant X)."""
    std = X.std()
    return (X - X.mean()) / std.where(std > 0, 1.0)


@SCORES.register("zpruner", needs_activations=True, default_group="row")
def zpruner(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """Z-Pruner importance (Bhuiyan et al. 2025, arXiv 2508.15828, sec. 3):
    z_r, z_c = the row- and the column-L2-normalised W, each standardised over the matrix;
    S = (α·|z_r|³ + (1 − α)·|z_c|³) · ‖x_j‖₂^1.5 with α = 0.7·(1 − 0.3·s), where s is the
    fraction of |W| below 0.1·mean|W| (the paper's sparsity-aware blend).

    The whole-matrix means and stds round as torch's thread count splits them; runs use the
    fast version, which gives this formula's bits on two threads whatever the count.
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


@SCORES.register("cvr", needs_activations=True, default_group="row", constants=CvrConstants)
def cvr(W: torch.Tensor, stats: ActivationStats, *, alpha: float, eps: float) -> torch.Tensor:
    """Variance-calibrated importance (statistical-correction paper, "CVR"):
    S_ij = |W_ij| · a_j · c_j with a_j = Var(x_j)^(1/4), the spread of input j over the
    calibration tokens, and c_j = (Var_i W_ij + ε)^(−α/2), which discounts columns whose
    weights vary widely across outputs. Compared within each output row.
    """
    a = stats.var.to(W.device).pow(0.25)
    c = (W.var(dim=0, unbiased=False) + eps).pow(-alpha / 2)
    return W.abs() * (a * c)[None, :]
