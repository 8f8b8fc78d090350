"""ADMM weight update and gradual-mask solver (Boža 2024, "Fast and Optimal Weight Update
for Pruned Large Language Models").

For a mask, the kept weights that best preserve the layer's outputs on the calibration
inputs solve min ‖X(W − Ŵ)ᵀ‖² with Ŵ zero off the mask: one least-squares problem per row,
each with its own support, too many to factorise one by one. ADMM splits it into an
unconstrained ridge step shared by every row (one factorisation of XᵀX + ρI for the whole
layer) and a projection onto the mask, with a dual variable U between them:

    Z ← (W + U) ⊙ keep;   U ← U + W − Z;   W ← (W₀H + ρ(Z − U)) (H + ρI)⁻¹

H = XᵀX with its inputs scaled to unit diagonal (so ρ means the same in every layer) and
damped by ``admm_damp``·I, which pulls the solution toward the dense weights where the
calibration says little. Each iteration is one [out, in] × [in, in] product.

Registered as the update ``--update admm`` (any method's mask, kept weights solved) and the
solver ``--method admm``, which also chooses the mask: during the first ``admm_steps``
iterations the sparsity rises on a cubic schedule to the target, each time keeping the
largest |W + U| (the scaled weights, i.e. |W|·‖x‖: Wanda's score of the current solution);
N:M groups keep their M − N largest throughout and lose the others gradually.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import Pattern, drop_lowest, keep_mask, n_pruned
from .registry import SOLVERS, UPDATES, constant


def _scaled_system(W0: torch.Tensor, H: torch.Tensor, damp: float, rho: float):
    """(scale [in], W scaled [out, in], W·H·(H + ρI)⁻¹ [out, in], (H + ρI)⁻¹ [in, in]), H
    scaled and damped.

    Inputs that never fire (H_jj = 0) get H_jj = 1: their weights cannot change the
    calibration outputs, so any finite value is as good as another.
    """
    H = H.to(W0.device, torch.float32).clone()
    diag = H.diagonal()
    diag[diag <= 0] = 1.0
    scale = diag.sqrt()
    H /= scale[:, None]
    H /= scale[None, :]
    H.diagonal().add_(damp)
    W = W0.float() * scale[None, :]
    B = W @ H
    H.diagonal().add_(rho)
    L, info = torch.linalg.cholesky_ex(H)
    # unit diagonal plus damp + ρ > 0 keeps this positive definite unless XᵀX is not
    # (a broken Hessian): then the explicit inverse still gives the ridge step
    inverse = torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.inv(H)
    return scale, W, B @ inverse, inverse


def cubic_sparsity(target: float, step: int, steps: int) -> float:
    """Sparsity after ``step`` (0-based) of ``steps``: target·(1 − (1 − (step+1)/steps)³),
    fast at first, exactly ``target`` at the last step."""
    return target * (1.0 - (1.0 - (step + 1) / steps) ** 3)


def gradual_keep(V: torch.Tensor, sparsity: float, target: float, pattern: Pattern,
                 group: str = "layer") -> torch.Tensor:
    """keep for |V| at an intermediate ``sparsity`` on the way to ``target``: unstructured,
    the layer's largest (``group`` 'layer') or each row's (``group`` 'row': every output
    keeps the same count, as Wanda's mask); N:M, each group's M − N largest always, the rest
    the largest of the others."""
    score = V.abs()
    if group == "row" and not pattern.is_nm:
        return drop_lowest(score, n_pruned(sparsity, score.shape[1]))
    if pattern.is_nm:
        final = keep_mask(score, target, pattern)
        if sparsity >= target:  # exact N:M, whatever the rounding of sparsity·numel
            return final
        score = score.masked_fill(final, float("inf"))
    return drop_lowest(score.reshape(1, -1), n_pruned(sparsity, score.numel())).reshape(V.shape)


@torch.no_grad()
def admm(W0: torch.Tensor, H: torch.Tensor, *, keep: torch.Tensor | None = None, sparsity: float = 0.0,
         pattern: Pattern = Pattern(), iters: int = 20, rho: float = 1.0, damp: float = 0.1,
         steps: int = 15, group: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(W', keep): W' [out, in] float32 with exactly keep's zeros.

    keep given: solve the kept weights for that mask. keep None: choose it gradually
    (``steps`` iterations, at most ``iters``) at ``sparsity`` for the layer (or for each row,
    ``group`` 'row'), or N:M.
    """
    scale, W, anchor, inverse = _scaled_system(W0, H, damp, rho)
    choose = keep is None
    if not choose:
        keep = keep.to(W.device)
    steps = min(steps, iters)
    U = torch.zeros_like(W)
    for i in range(iters):
        if choose and i < steps:
            keep = gradual_keep(W + U, cubic_sparsity(sparsity, i, steps), sparsity, pattern, group)
        Z = (W + U) * keep
        U += W - Z
        W = torch.addmm(anchor, Z - U, inverse, alpha=rho)  # (W₀H + ρ(Z − U))(H + ρI)⁻¹
    if choose and iters == 0:
        keep = gradual_keep(W, sparsity, sparsity, pattern, group)
    return (W + U) * keep / scale[None, :], keep


@dataclass(frozen=True, kw_only=True)
class ADMMConstants:
    admm_iters: int = constant(20, "ADMM iterations (one [out,in]x[in,in] product each)", minimum=0)
    admm_rho: float = constant(1.0, "ADMM penalty ρ, relative to the unit-diagonal Hessian", minimum=0.0,
                               strict=True)
    admm_damp: float = constant(0.1, "ADMM ridge toward the dense weights, relative to the unit-diagonal Hessian",
                                minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class ADMMSolverConstants(ADMMConstants):
    admm_steps: int = constant(15, "ADMM solver: iterations over which the mask's sparsity rises to the target")


@UPDATES.register("admm", needs_hessian=True, constants=ADMMConstants, ridge="admm_damp")
def solve_kept(W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats, *, admm_iters: int,
               admm_rho: float, admm_damp: float) -> torch.Tensor:
    """Another method's mask, the kept weights solved by ADMM from the dense ones."""
    return admm(W0, stats.xtx, keep=keep, iters=admm_iters, rho=admm_rho, damp=admm_damp)[0]


@SOLVERS.register("admm", needs_hessian=True, constants=ADMMSolverConstants, ridge="admm_damp", default_group="layer")
def solve(W0: torch.Tensor, stats, *, sparsity: float, pattern: Pattern, group: str, admm_iters: int,
          admm_rho: float, admm_damp: float, admm_steps: int):
    """Mask and weights together: gradual selection inside the ADMM iterations, compared
    over the layer (the reference's) or, with ``--group row``, within each row."""
    return admm(W0, stats.xtx, sparsity=sparsity, pattern=pattern, iters=admm_iters, rho=admm_rho,
                damp=admm_damp, steps=admm_steps, group=group)
