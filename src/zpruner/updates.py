"""Updates of the kept weights after a mask: ``update(W0, W, keep, ...) -> W'``, all [out, in].

W0 is the dense layer before pruning, W the pruned one (W0 masked, or already
reconstructed by SparseGPT), keep the mask (True = kept). Every update re-applies the
mask, so the sparsity it was given is the sparsity it returns.
"""
from __future__ import annotations

import torch

from .errors import ZprunerError

UPDATES = ("none", "ec", "ec-col", "ec-row", "sparsegpt")
EC_AXES = {"ec": ("col", "row"), "ec-col": ("col",), "ec-row": ("row",)}


def energy_scale(W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, γ) per slice along ``dim`` for energy compensation, unclamped.

    For each column (dim=0: statistics over the rows i of column j) or row (dim=1), with
    μ the mean of the dense slice W0: E0 = Σ (W0 − μ)² over the whole slice and
    E = Σ_kept (W − μ)²; γ = sqrt(E0 / E). Slices with E = 0 (nothing kept, or all kept
    weights equal μ) get γ = 1: there is nothing to scale.
    """
    mu = W0.mean(dim=dim, keepdim=True)
    e0 = (W0 - mu).square().sum(dim=dim, keepdim=True)
    e = ((W - mu) * keep).square().sum(dim=dim, keepdim=True)
    gamma = torch.where(e > 0, (e0 / e.where(e > 0, 1.0)).sqrt(), torch.ones_like(e))
    return mu, gamma


def energy_compensate(
    W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, axes: tuple[str, ...] = ("col", "row"),
    clamp: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Energy compensation (statistical-correction paper, "EC"), in the order of ``axes``.

    Along each axis the kept weights move away from the dense slice mean μ so that their
    centred energy Σ_kept (W' − μ)² equals the dense slice's Σ (W0 − μ)²:
    W' = μ + clamp(γ)·(W − μ) on kept entries, 0 elsewhere. The clamp bounds how far one
    slice may be rescaled when most of its energy was pruned away.
    """
    lo, hi = clamp
    W0, W = W0.float(), W.float() * keep
    for axis in axes:
        dim = {"col": 0, "row": 1}[axis]
        mu, gamma = energy_scale(W0, W, keep, dim)
        W = (mu + gamma.clamp(lo, hi) * (W - mu)) * keep
    return W


def check_update(name: str) -> None:
    if name not in UPDATES:
        raise ZprunerError(f"update '{name}' is unknown; choose one of {', '.join(UPDATES)}")


def check_clamp(clamp: tuple[float, float]) -> None:
    lo, hi = clamp
    if not 0 <= lo <= 1 <= hi:
        raise ZprunerError(
            f"EC clamp range {lo},{hi} is invalid: it must contain 1 (no change), with 0 <= LO <= 1 <= HI; e.g. 0.5,2"
        )
