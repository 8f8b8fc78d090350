"""Updates of the kept weights after a mask: ``update(W0, W, keep, stats, ...) -> W'``, all [out, in].

W0 is the dense layer before pruning, W the pruned one (already reconstructed by a solver),
or None for W0 masked by keep; keep is the mask (True = kept). Every update re-applies the
mask, so the sparsity it was given is the sparsity it returns. Registered here: 'none' and
energy compensation ('ec' = columns then rows, 'ec-col', 'ec-row'); SparseGPT's
reconstruction registers itself in ``sparsegpt.py``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .kernels import energy
from .kernels.rowpass import masked_copy
from .registry import UPDATES, constant


def check_clamp(clamp: tuple[float, float]) -> None:
    lo, hi = clamp
    if not 0 <= lo <= 1 <= hi:
        raise ZprunerError(
            f"EC clamp range {lo},{hi} is invalid: it must contain 1 (no change), with 0 <= LO <= 1 <= HI; e.g. 0.5,2"
        )


@dataclass(frozen=True, kw_only=True)
class EnergyConstants:
    # default from the held-out experiment in experiments/open_constants.md
    ec_clamp: tuple[float, float] = constant((0.8, 1.25), "bounds of the EC scale factors", check=check_clamp,
                                             keyword="clamp")


@UPDATES.register("none")
def keep_only(W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats=None) -> torch.Tensor:
    """No correction: the pruned weights as they are (W0·keep, made in chunks of rows)."""
    return masked_copy(W0.float(), keep) if W is None else W


def _gamma(e0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sqrt(E0 / E), and 1 where E = 0 (nothing kept, or all kept weights equal μ)."""
    return torch.where(e > 0, (e0 / e.where(e > 0, 1.0)).sqrt(), torch.ones_like(e))


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
    return mu, _gamma(e0, e)


def energy_compensate(
    W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, axes: tuple[str, ...] = ("col", "row"),
    clamp: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Energy compensation (statistical-correction paper, "EC"), in the order of ``axes``.

    Along each axis the kept weights move away from the dense slice mean μ so that their
    centred energy Σ_kept (W' − μ)² equals the dense slice's Σ (W0 − μ)²:
    W' = μ + clamp(γ)·(W − μ) on kept entries, 0 elsewhere. The clamp bounds how far one
    slice may be rescaled when most of its energy was pruned away. Returns a new tensor.
    """
    for axis in axes:
        if axis not in ("col", "row"):
            raise ZprunerError(f"EC axis '{axis}' is unknown; choose 'col' or 'row'")
    lo, hi = clamp
    W0, W = W0.float(), W.float() * keep
    for axis in axes:
        mu, gamma = energy_scale(W0, W, keep, dim=0 if axis == "col" else 1)
        W = (mu + gamma.clamp(lo, hi) * (W - mu)) * keep
    return W


def _energy(axes: tuple[str, ...], W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats=None, *,
            clamp: tuple[float, float]) -> torch.Tensor:
    """``energy_compensate`` as runs compute it: in chunked passes (``kernels.energy``),
    everywhere, as they give its bits on a matrix of one chunk (every SmolLM2 layer) and
    float32 reassociation of its column sums only across chunks. W is the caller's own
    float32 copy (or None): they may work in place."""
    return energy.energy_compensate_(W0, W, keep, axes, clamp)


# In the order the statistical-correction paper's ablation adds them.
for _name, _axes in (("ec-col", ("col",)), ("ec-row", ("row",)), ("ec", ("col", "row"))):
    UPDATES.register(_name, constants=EnergyConstants)(functools.partial(_energy, _axes))
