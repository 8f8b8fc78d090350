"""SparseGPT (Frantar & Alistarh 2023): prune and reconstruct one layer with the inverse
Hessian of its inputs, so the remaining weights absorb the error of the removed ones.

W: [out, in], H = XᵀX: [in, in] summed over calibration tokens (float32). The mask is
either chosen inside the solver, block by block from the OBS saliency w² / [H⁻¹]_jj²
(the paper's sec. 3.2 adaptive mask selection), or given (any score's mask, then only
reconstruction: the Z-Pruner code's ``--reconstruction``). Registered as the solver
``--method sparsegpt`` and as the update ``--update sparsegpt``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import ZprunerError
from .kernels import lapack, sparsegpt_columns
from .masks import Pattern, drop_lowest, n_pruned
from .registry import SOLVERS, UPDATES, constant

log = logging.getLogger(__name__)

MAX_DAMP_RAISES = 6


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H): [in, in], float32.

    Inputs that never fire (H_jj = 0) get H_jj = 1 so H stays invertible; their weights
    cannot change the calibration outputs. If the factorisation fails (H numerically
    singular), λ is raised tenfold with a warning and retried; never silently skipped.

    The reference's three steps (Cholesky, Cholesky inverse, upper Cholesky of the
    inverse); on the CPU their LAPACK routines are called directly (``zpruner.kernels.lapack``):
    the same bits as torch.linalg's functions, without their triangle copies.
    """
    H = H.float()
    # Working copies are freed as soon as the next one exists: for LLaMA-2-7B's down_proj
    # each is 485 MB, and with H + λI built from an identity matrix the factorisation peaked
    # at five of them, its input included (three with torch's functions, two with the
    # routines called directly: benchmarks/factor_memory.py), and a 7B SparseGPT run under
    # --offload disk at 4.37 GiB.
    direct = lapack.available(H)
    for attempt in range(MAX_DAMP_RAISES + 1):
        factor = damp * 10**attempt
        # A copy that, like H + λI, stores no -0.0 off the diagonal; for the direct routines
        # transposed, i.e. in LAPACK's column-major order (same diagonal, same mean).
        A = H.t().clone(memory_format=torch.contiguous_format).add_(0.0) if direct else H + 0.0
        diagonal = A.diagonal()
        diagonal[diagonal == 0] = 1.0
        diagonal += factor * diagonal.mean()  # the mean of the strided view: its own rounding
        del diagonal  # the view would keep the copy alive
        if direct:
            U = lapack.inverse_cholesky_upper_(A)
            del A
            if U is not None:
                return U
        else:
            L, info = torch.linalg.cholesky_ex(A)
            del A
            if info == 0:
                inverse = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                if info == 0:
                    return U
        if attempt < MAX_DAMP_RAISES:
            log.warning("SparseGPT: Hessian not positive definite with damping %g; retrying with %g",
                        factor, factor * 10)
    raise ZprunerError(
        f"SparseGPT: the Hessian stays singular even with damping {damp * 10**MAX_DAMP_RAISES:g}; "
        "use more calibration data (--nsamples, --seqlen)"
    )


def _saliency(W1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """OBS saliency W²/d² of columns W1: [out, cols] (any strides), d: [cols] from U's diagonal."""
    return W1.square() / d.square()[None, :]


def _block_keep(W1: torch.Tensor, d: torch.Tensor, pruned_before: int, pruned_after: int) -> torch.Tensor:
    """Unstructured mask of one column block W1: [out, cols] (any strides): drop the lowest
    saliencies W²/d², as many as make the layer's running count exact (floor(s·out·cols)
    over the columns so far), compared over the block in the reference's [out, cols]
    order (which decides among tied saliencies)."""
    k = pruned_after - pruned_before
    return drop_lowest(_saliency(W1, d).reshape(1, -1), k).reshape(W1.shape)


@torch.no_grad()
def sparsegpt(
    W: torch.Tensor, H: torch.Tensor, *, keep: torch.Tensor | None = None, sparsity: float = 0.0,
    pattern: Pattern = Pattern(), blocksize: int = 128, damp: float = 0.01, fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', keep): W' [out, in] float32 with exactly the zeros of keep.

    keep None: choose the mask inside the solver (unstructured at ``sparsity`` per layer,
    or N:M groups). keep given: reconstruct only. Columns are processed in blocks of
    ``blocksize`` (a multiple of M for N:M), with lazy updates of the later columns. On the
    CPU a block's column loop runs as compiled code (``kernels.sparsegpt_columns``), with
    the eager loop's bits, unless N:M groups are chosen in the loop (``fused``: see
    ``sparsegpt_columns.load``).

    Runs on torch's threads: on an idle 2-core CPU two threads were 1.5-1.7 times as fast
    as one from LLaMA-2-7B's layer shapes up, and 0.84-1.23 times on SmolLM2's small ones
    (benchmarks/sparsegpt_threads.py, docs/benchmarks.md); cap them with
    OMP_NUM_THREADS on a machine shared with other jobs. The factorisation (LAPACK's
    Cholesky and inverse) rounds differently on one thread and on two, while the column
    loop and the lazy update's product keep their bits; the adaptive mask follows the
    rounding: SmolLM2's quick SparseGPT+EC 2:4 cell is 146.858 on one thread, the float of
    the code before issue 14 (whose solver ran on one), and 145.550 on two. The
    factorisation is not held to one thread for reproducible bits: that made the solve
    of LLaMA-sized layers 1.2-1.3 times slower (benchmarks/README.md, "sparsegpt_threads.py"),
    and the same cell moves more from one CPU to another
    (experiments/quick_table.md, "SparseGPT's own float noise").
    """
    return _solve(W.float().clone(), H.to(W.device), keep, sparsity, pattern, blocksize, damp, fused)


def _solve(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor | None, sparsity: float, pattern: Pattern,
    blocksize: int, damp: float, fused: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = W.shape
    U = inverse_hessian_factor(H, damp)
    choose = keep is None
    if choose:
        keep = torch.ones_like(W, dtype=torch.bool)
    else:
        keep = keep.to(W.device).clone(memory_format=torch.contiguous_format)
    if pattern.is_nm:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    group_keep = _group_keep(pattern) if choose and pattern.is_nm else None
    kernel = sparsegpt_columns.load(W, U, keep, fused, groups_chosen=group_keep is not None)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        if choose and not pattern.is_nm:
            keep[:, i1:i2] = _block_keep(W[:, i1:i2], U.diagonal()[i1:i2], n_pruned(sparsity, d_out * i1),
                                         n_pruned(sparsity, d_out * i2))
        if kernel is not None:  # the compiled loop, where it applies (sparsegpt_columns.load)
            err1 = sparsegpt_columns.block(kernel, W, U, keep, i1, i2, pattern.m, group_keep)
        else:
            err1 = _eager_block(W, U[i1:i2, i1:i2], keep, i1, i2, pattern.m, group_keep)
        # The lazy update multiplies the reference's own layout: BLAS may sum in another
        # order for a transposed operand (it did for a 96 x 64 by 64 x 8 product). In place,
        # it is the reference's product and subtraction without a temporary the size of the
        # rest of W (tests/test_methods.py checks the bits).
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1)
    return W.mul_(keep), keep  # W is this solve's own copy


def _group_keep(pattern: Pattern):
    """The N:M mask of a group of columns Wg: [out, M] (any strides) with U's diagonal d:
    [M] there, chosen in the column loop: the N lowest saliencies of each row."""
    return lambda Wg, d: drop_lowest(_saliency(Wg, d), pattern.n)


def _eager_block(W, U1, keep, i1, i2, group, group_keep) -> torch.Tensor:
    """One block's column loop in torch ops, updating W and keep in place; returns the
    block's errors [out, width] for the lazy update. With ``group_keep``, the mask of every
    ``group`` columns is chosen as the loop reaches them (N:M). The reference whose bits
    ``kernels.sparsegpt_columns.block`` computes compiled."""
    # The block is worked on transposed, [cols, out], so that a column of W and every
    # rank-1 update below run over contiguous memory: the same elementwise operations
    # as the reference on each weight, hence the same bits; with the in-place update
    # below, the solve takes half the time at 5120 inputs (benchmarks/sparsegpt_solver.py,
    # benchmarks/out/sparsegpt_solver.json).
    W1 = W[:, i1:i2].t().contiguous()
    keep1 = keep[:, i1:i2].t().contiguous()
    err1 = torch.empty_like(W1)
    for j in range(i2 - i1):
        if group_keep is not None and j % group == 0:
            columns = slice(j, j + group)
            keep1[columns] = group_keep(W1[columns].t(), U1.diagonal()[columns]).t()
        w, dj = W1[j], U1[j, j]
        err = (w - w * keep1[j]) / dj
        W1[j:] -= U1[j, j:, None] * err[None, :]
        err1[j] = err
    keep[:, i1:i2] = keep1.t()
    W[:, i1:i2] = (W1 * keep1).t()
    return err1.t().contiguous()


@dataclass(frozen=True, kw_only=True)
class SparseGPTConstants:
    blocksize: int = constant(128, "SparseGPT column block")
    damp: float = constant(0.01, "SparseGPT damping, fraction of the mean Hessian diagonal", minimum=0.0, strict=True)


@SOLVERS.register("sparsegpt", needs_hessian=True, constants=SparseGPTConstants, ridge="damp")
def solve(W0: torch.Tensor, stats, *, sparsity: float, pattern: Pattern, blocksize: int, damp: float):
    """The mask chosen inside the reconstruction (the paper's adaptive mask selection)."""
    return sparsegpt(W0, stats.xtx, sparsity=sparsity, pattern=pattern, blocksize=blocksize, damp=damp)


@UPDATES.register("sparsegpt", needs_hessian=True, constants=SparseGPTConstants, ridge="damp")
def reconstruct(W0: torch.Tensor, W: torch.Tensor | None, keep: torch.Tensor, stats, *, blocksize: int,
                damp: float) -> torch.Tensor:
    """Another method's mask, the kept weights reconstructed from the dense ones."""
    return sparsegpt(W0, stats.xtx, keep=keep, blocksize=blocksize, damp=damp)[0]
