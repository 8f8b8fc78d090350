"""The scores of ``zpruner.scores`` (RIA, Z-Pruner, CVR) computed faster, attached to their
registered methods (``Registry.accelerate``), which run them instead of the formulas:
S: [out, in] float32 from W: [out, in] and the activation statistics, as there.

Each score is written as one new [out, in] tensor and in-place ops on it (or on
chunk-sized scratch, see ``rowpass``): the formula's arithmetic in the formula's order,
without a fresh full-size temporary per subexpression. The column norms and variances are
``columns``' (torch's bits, faster), Z-Pruner's whole-matrix scalars ``reductions``' (torch's
two-thread bits on any thread count).
"""
from __future__ import annotations

import torch

from ..registry import SCORES
from . import native, rowpass
from .columns import column_norm, column_variance
from .reductions import fraction_below_, matrix_mean, matrix_std
from .rowpass import Scratch, map_chunks


@SCORES.accelerate("ria")
def ria(W: torch.Tensor, stats, *, a: float) -> torch.Tensor:
    """``scores.ria`` in place on |W|, the relative terms a chunk of rows at a time."""
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


@SCORES.accelerate("zpruner")
def zpruner(W: torch.Tensor, stats) -> torch.Tensor:
    """``scores.zpruner`` bit for bit as torch runs the formula on two threads, on any thread
    count: the norms are torch's own reductions over the whole matrix, the means and stds
    its two-thread ones (``reductions``; chunked partial sums, as issue 14 had them, moved
    the verified SmolLM2 4:8 and 2:4 perplexities by over 1 %). Each whole-matrix operand
    is written in turn into the score's own buffer, the column-normalised W last, so that
    the chunked pass that makes the score from it in place allocates nothing else
    full-size.
    """
    W = W.float()
    S = torch.empty_like(W)  # the score in the end; until then each whole-matrix operand in turn

    def abs_and_row_norms(rows: slice, _scratch: Scratch) -> torch.Tensor:
        # |W| and the row norms in one read of W; a row's norm is reduced within the row,
        # so a chunk of rows gives torch's bits for the whole matrix
        torch.abs(W[rows], out=S[rows])
        return W[rows].norm(dim=1, keepdim=True)

    row_norm = torch.cat(map_chunks(abs_and_row_norms, W, 0))
    col_norm = column_norm(W)[None, :]
    row_norm, col_norm = row_norm.where(row_norm > 0, 1.0), col_norm.where(col_norm > 0, 1.0)

    def standardisation(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (unbiased, as torch.std; 1 for a constant matrix) of X."""
        mean = matrix_mean(X)
        std = matrix_std(X, mean)
        return mean, std.where(std > 0, 1.0)

    def row_normalised(rows: slice) -> None:
        torch.div(W[rows], row_norm[rows], out=S[rows])

    threshold = 0.1 * matrix_mean(S)  # S holds |W|
    # (|W| < 0.1·mean|W|).float().mean(); S becomes W / row_norm as it is counted
    small = fraction_below_(S, threshold, then=row_normalised)
    if small is None:  # the count needs |W| as floats
        small = fraction_below_(torch.abs(W, out=S), threshold)
        torch.div(W, row_norm, out=S)
    alpha = 0.7 * (1 - 0.3 * small)
    mean_r, std_r = standardisation(S)
    mean_c, std_c = standardisation(torch.div(W, col_norm, out=S))  # S holds W / col_norm from here on
    act = stats.l2.to(W.device).pow(1.5)[None, :]
    kernel = _score_kernel(W, S, row_norm, act)
    if kernel is not None:
        blend = [float(v) for v in (mean_r, std_r, mean_c, std_c, alpha, 1 - alpha)]

    def score(rows: slice, scratch: Scratch) -> None:
        if kernel is not None:
            kernel.zpruner_score(W[rows].data_ptr(), W.stride(0), S[rows].data_ptr(), S.stride(0),
                                 row_norm[rows].data_ptr(), act.data_ptr(), *blend, rows.stop - rows.start, W.shape[1])
            return
        block = W[rows]
        z_r = torch.div(block, row_norm[rows], out=scratch.get(0, block.shape[0])).sub_(mean_r).div_(std_r)
        z_c = S[rows].sub_(mean_c).div_(std_c)
        z_r.abs_().pow_(3).mul_(alpha)
        z_c.abs_().pow_(3).mul_(1 - alpha)
        z_c.add_(z_r).mul_(act)

    map_chunks(score, W)
    return S


_KERNEL = ("zpruner_kernel", (
    ("zpruner_score", (native.POINTER, native.INT64, native.POINTER, native.INT64, native.POINTER, native.POINTER,
                       *(native.FLOAT,) * 6, native.INT64, native.INT64)),
))


def _score_kernel(W: torch.Tensor, S: torch.Tensor, row_norm: torch.Tensor, act: torch.Tensor):
    """The compiled score pass (``zpruner_kernel.c``: the eager pass's bits, one read of each
    weight) for CPU float32 matrices over a chunk; None elsewhere (GPU, other dtypes, every
    SmolLM2 layer) or when it does not build."""
    applies = (W.numel() > rowpass.CHUNK_ELEMENTS and native.fits(W, S, layout="rows")
               and native.fits(row_norm, act))
    return native.load(*_KERNEL) if applies else None


@SCORES.accelerate("cvr")
def cvr(W: torch.Tensor, stats, *, alpha: float, eps: float) -> torch.Tensor:
    """``scores.cvr`` with ``columns.column_variance`` for torch's column variances, in place
    on |W|."""
    a = stats.var.to(W.device).pow(0.25)
    c = (column_variance(W) + eps).pow(-alpha / 2)
    return W.abs().mul_((a * c)[None, :])
