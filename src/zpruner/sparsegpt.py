"""SparseGPT (Frantar & Alistarh 2023): prune and reconstruct one layer with the inverse
Hessian of its inputs, so the remaining weights absorb the error of the removed ones.

W: [out, in], H = XᵀX: [in, in] summed over calibration tokens (float32). The mask is
either chosen inside the solver, block by block from the OBS saliency w² / [H⁻¹]_jj²
(the paper's sec. 3.2 adaptive mask selection), or given (any score's mask, then only
reconstruction: the Z-Pruner code's ``--reconstruction``).
"""
from __future__ import annotations

import logging

import torch

from .config import Pattern
from .errors import ZprunerError
from .masks import drop_lowest, n_pruned
from .rowpass import map_chunks, one_cpu_thread

log = logging.getLogger(__name__)

MAX_DAMP_RAISES = 6
SUB_BLOCK = 16  # columns per rank-1-update sub-block inside a block (see _solve_block)


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H): [in, in], float32.

    Inputs that never fire (H_jj = 0) get H_jj = 1 so H stays invertible; their weights
    cannot change the calibration outputs. If the factorisation fails (H numerically
    singular), λ is raised tenfold with a warning and retried; never silently skipped.
    """
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean_diag = H.diagonal().mean()
    for attempt in range(MAX_DAMP_RAISES + 1):
        factor = damp * 10**attempt
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * torch.eye(len(H), dtype=H.dtype, device=H.device))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        if attempt < MAX_DAMP_RAISES:
            log.warning("SparseGPT: Hessian not positive definite with damping %g; retrying with %g",
                        factor, factor * 10)
    raise ZprunerError(
        f"SparseGPT: the Hessian stays singular even with damping {damp * 10**MAX_DAMP_RAISES:g}; "
        "use more calibration data (--nsamples, --seqlen)"
    )


def _block_keep(W1: torch.Tensor, d: torch.Tensor, pruned_before: int, pruned_after: int) -> torch.Tensor:
    """Unstructured mask of one column block: drop the lowest saliencies W²/d², as many as
    make the layer's running count exact (floor(s·out·cols) over the columns so far)."""
    saliency = (W1.square() / d.square()[None, :]).reshape(1, -1)
    return drop_lowest(saliency, pruned_after - pruned_before).reshape(W1.shape)


@torch.no_grad()
def sparsegpt(
    W: torch.Tensor, H: torch.Tensor, *, keep: torch.Tensor | None = None, sparsity: float = 0.0,
    pattern: Pattern = Pattern(), blocksize: int = 128, damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', keep): W' [out, in] float32 with exactly the zeros of keep.

    keep None: choose the mask inside the solver (unstructured at ``sparsity`` per layer,
    or N:M groups). keep given: reconstruct only. Columns are processed in blocks of
    ``blocksize`` (a multiple of M for N:M), with lazy updates of the later columns.
    """
    return _solve(W.float().clone(), H.to(W.device), keep, sparsity, pattern, blocksize, damp)


def _solve(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor | None, sparsity: float, pattern: Pattern,
    blocksize: int, damp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = W.shape
    # Rows are independent in the column loop (each row's error only moves that row's
    # later weights), so each block runs on chunks of rows in parallel worker threads;
    # only the unstructured mask of a block compares across rows and is chosen before.
    # Torch itself stays on one thread meanwhile, the factorisation included: the loop is
    # thousands of small ops, each a parallel region whose barrier waits for a descheduled
    # thread on a busy machine (two threads made a 576 x 1536 layer over ten times slower
    # than one), and MKL's Cholesky on two threads took 6.4 s for a 2048 x 2048 Hessian on
    # this busy 2-core machine, 0.39 s on one. See ``rowpass.map_chunks``.
    workers = torch.get_num_threads()
    rows = max(1, -(-d_out // (2 * workers)))  # two chunks per worker: a stalled one is caught up
    with one_cpu_thread(W.device):
        U = inverse_hessian_factor(H, damp)
        choose = keep is None
        keep = torch.ones_like(W, dtype=torch.bool) if choose else keep.to(W.device).clone()
        if pattern.is_nm:
            blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
        for i1 in range(0, d_in, blocksize):
            _solve_block(W, U, keep, i1, min(i1 + blocksize, d_in), choose, sparsity, pattern, rows, workers)
    return W * keep, keep


def _solve_block(
    W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, i1: int, i2: int, choose: bool, sparsity: float,
    pattern: Pattern, rows: int, workers: int,
) -> None:
    """Columns [i1, i2) of the solve, in place on W and keep (the reference's block step:
    the block's mask, the column loop with its updates inside the block, then one lazy
    update of the later columns)."""
    d_out = W.shape[0]
    U1 = U[i1:i2, i1:i2]
    if choose and not pattern.is_nm:
        keep[:, i1:i2] = _block_keep(W[:, i1:i2], U1.diagonal(), n_pruned(sparsity, d_out * i1),
                                     n_pruned(sparsity, d_out * i2))

    # Inside the block the same lazy batching once more: rank-1 updates only within
    # sub-blocks of SUB_BLOCK columns, then one product for the rest of the block. Every
    # column still receives every earlier column's update before it is read (N:M groups
    # lie within a sub-block), so only the float32 summation order changes.
    sub = pattern.m * max(1, SUB_BLOCK // pattern.m) if pattern.is_nm else SUB_BLOCK

    def rows_of_block(r: slice, _scratch) -> None:
        W1, keep1 = W[r, i1:i2].clone(), keep[r, i1:i2]
        err1 = torch.zeros_like(W1)
        width = i2 - i1
        for s1 in range(0, width, sub):
            s2 = min(s1 + sub, width)
            for j in range(s1, s2):
                if choose and pattern.is_nm and j % pattern.m == 0:
                    group = slice(j, j + pattern.m)
                    saliency = W1[:, group].square() / U1.diagonal()[group].square()[None, :]
                    keep1[:, group] = drop_lowest(saliency, pattern.n)
                w, dj = W1[:, j], U1[j, j]
                err = (w - w * keep1[:, j]) / dj
                W1[:, j:s2].addr_(err, U1[j, j:s2], alpha=-1)  # −= err ⊗ U1[j, j:s2], no temporary
                err1[:, j] = err
            if s2 < width:
                W1[:, s2:].addmm_(err1[:, s1:s2], U1[s1:s2, s2:], alpha=-1)
        W[r, i1:i2] = W1 * keep1
        W[r, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1)

    map_chunks(rows_of_block, W, buffers=0, rows=rows, workers=workers)
