"""Importance scores: pure functions ``score(W, stats, **constants) -> S``, W and S: [out, in], float32.

Higher means more important. Each score is registered (``zpruner.registry``) with the
statistics it needs, its default comparison group and the dataclass of its constants; a new
method is one decorated function here or in a module of its own. SparseGPT is the one
method that is not a score: it chooses its mask inside its reconstruction (a solver, see
``sparsegpt.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .registry import SCORES, Method, constant, get_method
from .rowpass import Scratch, map_chunks
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


# The scores below are written as one new [out, in] tensor and in-place ops on it (or on
# chunk-sized scratch, see ``rowpass``): the same arithmetic as the formula in the
# docstring, without a fresh full-size temporary per subexpression.

@SCORES.register("wanda", needs_activations=True, default_group="row")
def wanda(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """S_ij = |W_ij| · ‖x_j‖₂ (Sun et al. 2023, Wanda, eq. 1), compared within each output row."""
    return W.abs().mul_(stats.l2.to(W.device)[None, :])


@SCORES.register("ria", needs_activations=True, default_group="layer", constants=RiaConstants)
def ria(W: torch.Tensor, stats: ActivationStats, *, a: float) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024, RIA, eq. 3):
    S_ij = (|W_ij| / Σ_i|W_ij| + |W_ij| / Σ_j|W_ij|) · ‖x_j‖₂^a, compared over the whole layer.

    An all-zero column or row contributes 0 (not NaN) to its relative term.
    """
    S = W.abs()
    col_sum = S.sum(dim=0, keepdim=True)
    row_sum = S.sum(dim=1, keepdim=True)
    col_sum, row_sum = col_sum.where(col_sum > 0, 1.0), row_sum.where(row_sum > 0, 1.0)
    act = stats.l2.to(W.device).pow(a)[None, :]

    def part(rows: slice, scratch: Scratch) -> None:
        A = S[rows]
        by_row = torch.div(A, row_sum[rows], out=scratch.get(0, A.shape[0]))
        A.div_(col_sum).add_(by_row).mul_(act)

    map_chunks(part, S)
    return S


@SCORES.register("zpruner", needs_activations=True, default_group="row")
def zpruner(W: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    """Z-Pruner importance (Bhuiyan et al. 2025, arXiv 2508.15828, sec. 3):
    z_r, z_c = the row- and the column-L2-normalised W, each standardised over the matrix;
    S = (α·|z_r|³ + (1 − α)·|z_c|³) · ‖x_j‖₂^1.5 with α = 0.7·(1 − 0.3·s), where s is the
    fraction of |W| below 0.1·mean|W| (the paper's sparsity-aware blend).

    Bit for bit the textbook form (the reference in tests/test_fast_paths.py): its
    whole-matrix statistics (norms, mean and std of each normalised matrix, mean|W| and
    s) are torch's own reductions over whole [out, in] matrices, whose summation order
    chunked partial sums would not reproduce (they moved the verified SmolLM2 4:8 and 2:4
    perplexities by over 1 %); every such matrix is written in turn into the score's own
    buffer, so nothing else full-size is allocated. The elementwise score is then one
    chunked pass.
    """
    W = W.float()
    row_norm = W.norm(dim=1, keepdim=True)
    col_norm = W.norm(dim=0, keepdim=True)
    row_norm, col_norm = row_norm.where(row_norm > 0, 1.0), col_norm.where(col_norm > 0, 1.0)
    S = torch.empty_like(W)  # the score in the end; until then each whole-matrix operand in turn

    def standardisation(norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (unbiased, as torch.std; 1 for a constant matrix) of W / norm."""
        X = torch.div(W, norm, out=S)
        std = X.std()
        return X.mean(), std.where(std > 0, 1.0)

    mean_r, std_r = standardisation(row_norm)
    mean_c, std_c = standardisation(col_norm)
    A = torch.abs(W, out=S)
    small = torch.lt(A, 0.1 * A.mean(), out=S).mean()  # (A < 0.1·mean|A|).float().mean(), in S
    alpha = 0.7 * (1 - 0.3 * small)
    act = stats.l2.to(W.device).pow(1.5)[None, :]

    def score(rows: slice, scratch: Scratch) -> None:
        block = W[rows]
        z_r = torch.div(block, row_norm[rows], out=scratch.get(0, block.shape[0])).sub_(mean_r).div_(std_r)
        z_c = torch.div(block, col_norm, out=scratch.get(1, block.shape[0])).sub_(mean_c).div_(std_c)
        z_r.abs_().pow_(3).mul_(alpha)
        z_c.abs_().pow_(3).mul_(1 - alpha)
        torch.add(z_r, z_c, out=S[rows]).mul_(act)

    map_chunks(score, W, 2)
    return S


@SCORES.register("cvr", needs_activations=True, default_group="row", constants=CvrConstants)
def cvr(W: torch.Tensor, stats: ActivationStats, *, alpha: float, eps: float) -> torch.Tensor:
    """Variance-calibrated importance (statistical-correction paper, "CVR"):
    S_ij = |W_ij| · a_j · c_j with a_j = Var(x_j)^(1/4), the spread of input j over the
    calibration tokens, and c_j = (Var_i W_ij + ε)^(−α/2), which discounts columns whose
    weights vary widely across outputs. Compared within each output row.
    """
    a = stats.var.to(W.device).pow(0.25)
    # torch's own column variance, although a chunked centred energy is about four times
    # faster: its different rounding moved the SmolLM2 50 % cell from 81.951 to 81.870,
    # and verified results stay as they are (benchmarks/README.md, issue 14 notes)
    c = (W.var(dim=0, unbiased=False) + eps).pow(-alpha / 2)
    return W.abs().mul_((a * c)[None, :])
