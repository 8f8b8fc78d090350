"""SparseGPT's column loop within a block (``sparsegpt._eager_block``) as compiled code
(``sparsegpt_kernel.c``), its output rows shared out over the worker threads: the eager
loop's bits, in W's own layout (no transposed copies), without four torch ops and a
temporary per column in Python (benchmarks/native_kernels.py).

W: [out, in] float32 worked on in place; U: [in, in], the upper Cholesky factor of H⁻¹;
keep: [out, in] bool, True = kept.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import native
from .rowpass import map_chunks

_KERNEL = ("sparsegpt_kernel", (
    ("sparsegpt_columns", (native.POINTER, native.INT64) * 4 + (native.INT64,) * 4, native.INT),
))


def load(W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, fused: bool | None, groups_chosen: bool = False):
    """The compiled column loop where it builds and applies (CPU, float32, contiguous), else
    None. fused None: unless N:M groups are chosen inside the loop (a kernel call per group,
    each copying the block's tiles in and out, lost to the torch loop:
    benchmarks/native_kernels.py); True: always; False: never."""
    applies = (fused is not False and native.fits(W) and native.fits(U, layout="any")
               and native.fits(keep, dtype=torch.bool) and keep.shape == W.shape and (fused or not groups_chosen))
    return native.load(*_KERNEL) if applies else None


def block(kernel, W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, i1: int, i2: int, group: int | None = None,
          group_keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Columns i1..i2 of W worked off in place, as the eager block loop does, with the mask
    keep[:, i1:i2]; returns the block's errors [out, i2 − i1] for the lazy update. With
    ``group_keep``, the mask of every ``group`` columns is chosen just before they are
    worked off: group_keep(W's columns [out, group], their diagonal of U) -> their keep."""
    d_out, d_in = W.shape
    width = i2 - i1
    U1 = U[i1:i2, i1:i2].contiguous()  # LAPACK's factor comes column-major
    diagonal = U1.diagonal()
    err1 = torch.empty(d_out, width, dtype=W.dtype, device=W.device)
    step = group if group_keep is not None else width
    rows = -(-d_out // (2 * torch.get_num_threads()))  # two pieces a thread: one stalled thread delays less
    for j1 in range(0, width, step):
        j2 = min(j1 + step, width)
        if group_keep is not None:
            keep[:, i1 + j1:i1 + j2] = group_keep(W[:, i1 + j1:i1 + j2], diagonal[j1:j2])

        def columns(part: slice, _scratch) -> int:
            return kernel.sparsegpt_columns(W[part.start, i1:].data_ptr(), d_in, keep[part.start, i1:].data_ptr(),
                                            d_in, U1.data_ptr(), width, err1[part.start].data_ptr(), width,
                                            part.stop - part.start, j1, j2, width)

        if any(map_chunks(columns, W, 0, rows=rows)):
            raise MemoryError(f"SparseGPT: no memory for a {width}-column block's work buffers")
    W[:, i1:i2].mul_(keep[:, i1:i2])
    return err1
