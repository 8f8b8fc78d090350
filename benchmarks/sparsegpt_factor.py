"""Where SparseGPT's per-layer time goes on one layer: the XᵀX statistics, the
inverse-Hessian factorisation (the reference's Cholesky, Cholesky inverse and upper
Cholesky with torch's functions, timed apart; then zpruner's whole factorisation with
those functions and with the same LAPACK routines called directly, ``zpruner.kernels.lapack``,
whose bits are checked equal) and the whole solve (column loop, lazy updates), on the
layer_runtime.py data (W ~ N(0, 1/in) with seed 1, 2048 activations with outlier channels,
seed 0), 50 % adaptive mask; medians of ``--repeats``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sparsegpt_factor.py --shape 5120x5120 | tee benchmarks/out/sparsegpt_factor.txt
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from _common import markdown_table, parse_shape
from layer_runtime import random_activations, random_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default="5120x5120", help="OUTxIN")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from zpruner import sparsegpt
    from zpruner.kernels import lapack
    from zpruner.stats import ActivationStats

    d_out, d_in = args.shape
    W = random_layer(d_out, d_in, torch.Generator().manual_seed(1))
    x = random_activations(2048, d_in, torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    for _ in range(args.repeats + 1):  # the first round warms up
        stats = ActivationStats(d_in, hessian=True)
        timed("statistics (XᵀX)", lambda: [stats.add(batch) for batch in x.split(4096)])
        H = stats.xtx
        A = H.clone()
        A.diagonal().add_(0.01 * A.diagonal().mean())
        L = timed("factorisation: Cholesky", lambda: torch.linalg.cholesky(A))
        inverse = timed("factorisation: Cholesky inverse", lambda: torch.cholesky_inverse(L))
        timed("factorisation: upper Cholesky of the inverse", lambda: torch.linalg.cholesky(inverse, upper=True))
        with mock.patch.object(lapack, "available", lambda A: False):
            U_torch = timed("inverse_hessian_factor, torch.linalg functions",
                            lambda: sparsegpt.inverse_hessian_factor(H, 0.01))
        U_direct = timed("inverse_hessian_factor, LAPACK routines called directly",
                         lambda: sparsegpt.inverse_hessian_factor(H, 0.01))
        if not lapack.available(H):
            raise SystemExit("zpruner.kernels.lapack does not apply here (no C compiler, or no spotrf_ in torch's library)")
        if not torch.equal(U_torch.view(torch.int32), U_direct.view(torch.int32)):
            raise SystemExit("the direct routines gave other bits than torch's functions")
        del U_torch, U_direct
        timed("whole solve (factorisation included)", lambda: sparsegpt.sparsegpt(W, H, sparsity=0.5))
    rows = [[name, f"{statistics.median(t[1:]):.3f}"] for name, t in times.items()]
    print(f"{d_out}x{d_in}, {torch.get_num_threads()} torch threads, medians of {args.repeats}\n")
    print(markdown_table(["step", "s"], rows, right={1}))
    print("\nboth factorisations gave the same bits in every round")


if __name__ == "__main__":
    main()
