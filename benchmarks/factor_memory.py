"""Peak memory of SparseGPT's inverse-Hessian factorisation (`zpruner.sparsegpt.
inverse_hessian_factor`) as a multiple of its input XᵀX: [d_in, d_in] float32, the number
behind the Hessian term of `zpruner.offload.disk_peak_bytes`.

One fresh process per d_in (a process's peak RSS only grows); in it, H is built from
d_in / 4 random tokens plus d_in on the diagonal, so building it peaks below what the
factorisation needs, then the factorisation runs and the process's own high-water mark
(getrusage) is compared with its resident memory just before.

    .venv/bin/python benchmarks/factor_memory.py --d-in 4096,11008 | tee benchmarks/out/factor_memory.txt
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def child(d_in: int) -> None:
    import torch
    from zpruner.offload import give_back_freed_memory
    from zpruner.sparsegpt import inverse_hessian_factor

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(d_in // 4, d_in, generator=gen)
    H = X.T @ X
    H.diagonal().add_(float(d_in))
    del X
    give_back_freed_memory()
    with open("/proc/self/status") as f:
        before = int(f.read().split("VmRSS:")[1].split()[0]) * 1024
    inverse_hessian_factor(H, 0.01)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = d_in * d_in * 4
    print(f"| {d_in} | {size / 2**20:.0f} | {(peak - before) / 2**20:.0f} | {1 + (peak - before) / size:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", default="4096,11008", help="comma-separated input sizes")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    print("| d_in | XᵀX MiB | peak over the resident memory before, MiB | peak in XᵀX sizes, XᵀX included |")
    print("| ---: | ---: | ---: | ---: |", flush=True)
    for d_in in args.d_in.split(","):
        subprocess.run([sys.executable, __file__, "--child", d_in.strip()], check=True)


if __name__ == "__main__":
    main()
