"""The upper Cholesky factor of a matrix's inverse, with the LAPACK routines torch calls
on the CPU called directly, on one working matrix.

Why: ``torch.linalg.cholesky_ex`` and ``torch.cholesky_inverse`` wrap LAPACK's ``spotrf``
and ``spotri`` in layout changes (row-major tensors, column-major LAPACK), and on the CPU
each factorisation first copies a triangle of its input with a strided loop
(``tril_out``/``triu_out`` into a column-major output). For SparseGPT's H⁻¹ factor at
5120 inputs those copies took as long as the factorisations (benchmarks/sparsegpt_factor.py).
Here the same two routines of the same library (``spotrf_``/``spotri_`` looked up in
torch's own CPU library, hence torch's MKL or OpenBLAS and its thread setting) run on the
same values in the same layout: torch's bits, with one n x n buffer instead of three.

Used only where it applies (CPU, float32, square) and where torch's library exports the
routines and the triangle copy (``triangle_kernel.c``, built by ``native``) builds; else
callers keep torch's functions (``available``).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from . import native

log = logging.getLogger(__name__)

_MIRROR = ("triangle_kernel", (("mirror_upper_to_lower", (native.POINTER, native.INT64, native.INT64)),))
_INT_P = ctypes.POINTER(ctypes.c_int)


def _routines() -> tuple | None:
    """(spotrf, spotri, mirror) or None. The mirror is loaded on each call, for
    ``native.used``'s record of the runs that call the routines."""
    mirror = native.load(*_MIRROR)
    routines = _torch_routines() if mirror is not None else None
    return None if routines is None else (*routines, mirror.mirror_upper_to_lower)


@functools.cache
def _torch_routines() -> tuple | None:
    """(spotrf, spotri) of torch's own library, or None, logged once."""
    # torch's own library, by its file: dlsym through its handle also searches the BLAS it
    # was linked against, so this finds whichever spotrf_ torch itself calls.
    libraries = sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*"))
    try:
        library = ctypes.CDLL(str(libraries[0]))
        routines = library.spotrf_, library.spotri_
    except (IndexError, OSError, AttributeError) as error:
        log.info("LAPACK routines not found in torch's library (%s): using torch.linalg", error)
        return None
    for routine in routines:  # LP64, as torch declares them: (uplo, n, a, lda, info)
        routine.argtypes = [ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P]
        routine.restype = None
    return routines


def available(A: torch.Tensor) -> bool:
    return (native.fits(A, layout="any") and A.dim() == 2 and A.shape[0] == A.shape[1]
            and 0 < A.shape[0] < 2**31 and _routines() is not None)


def _lapack(routine, uplo: bytes, B: torch.Tensor) -> int:
    n, info = ctypes.c_int(B.shape[0]), ctypes.c_int(0)
    routine(uplo, ctypes.byref(n), B.data_ptr(), ctypes.byref(n), ctypes.byref(info))
    return info.value


def inverse_cholesky_upper_(B: torch.Tensor) -> torch.Tensor | None:
    """U (upper triangular, U.T @ U = A⁻¹) for the matrix A whose *transpose* B holds,
    row-major (``B = A.t().contiguous()``: A's column-major storage, as LAPACK reads it);
    None if A is not positive definite. Only A's lower triangle is read. B (contiguous) is
    overwritten and U is a view of it, column-major, as torch returns it.

    Bit for bit ``torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)`` with
    ``L = torch.linalg.cholesky_ex(A)``, when ``available(B)``: LAPACK sees each routine's
    input triangle with the same values in the same layout as under torch (tests)."""
    potrf, potri, mirror = _routines()
    if not B.is_contiguous():
        raise ValueError("inverse_cholesky_upper_ works in place on a contiguous matrix")
    # A's lower triangle (column-major) is B's upper one (row-major): L, then the inverse's
    # lower triangle, are written there; spotrf("U") then reads A⁻¹'s upper triangle,
    # which is B's lower one once mirrored, and writes U there.
    if _lapack(potrf, b"L", B) != 0 or _lapack(potri, b"L", B) != 0:
        return None
    mirror(B.data_ptr(), B.shape[0], B.stride(0))
    if _lapack(potrf, b"U", B) != 0:
        return None
    return B.tril_().t()  # torch's U has zeros below its diagonal: B's upper triangle here
