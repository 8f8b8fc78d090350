"""EC's row pass fused by ``torch.compile`` against zpruner's eager chunked pass: tried and
not kept (benchmarks/README.md, "ec_fused.py").

On one LLaMA-2-13B MLP-shaped layer (W0 ~ N(0, 1/in), a random 50 % mask), EC's row axis
alone (the masked copy, the row statistics and the rescale in one pass over chunks of
rows on the worker threads): eager (``energy_compensate_`` with axes ('row',), what
zpruner runs) and compiled (one function per chunk, inductor, serial kernels, the mask as uint8), each
writing a fresh output as EC does; the plain masked copy for reference. Also prints the
first call's compile time. Medians of ``--repeats``, interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ec_fused.py | tee benchmarks/out/ec_fused.txt
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import markdown_table, parse_shape


def row_step(dense, W, keep, lo, hi):
    """EC's row axis alone on a chunk of a score-masked layer: W = W0·keep, rescaled per row."""
    kept = keep.to(dense.dtype)
    mu = dense.mean(dim=1, keepdim=True)
    e0 = (dense - mu).square().sum(dim=1, keepdim=True)
    block = dense * kept - mu
    e = (block * kept).square().sum(dim=1, keepdim=True)
    gamma = torch.where(e > 0, (e0 / e.where(e > 0, 1.0)).sqrt(), torch.ones_like(e)).clamp(lo, hi)
    W.copy_((block * gamma + mu) * kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default="13824x5120", help="OUTxIN")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    from zpruner.kernels.rowpass import map_chunks, masked_copy
    from zpruner.kernels.energy import energy_compensate_

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(*args.shape, generator=g) / args.shape[1] ** 0.5
    keep = torch.rand(*args.shape, generator=g) > 0.5
    keep8 = keep.view(torch.uint8)
    lo, hi = torch.tensor(0.8), torch.tensor(1.25)
    fused = torch.compile(row_step, dynamic=True, options={"cpp.threads": 1})

    def compiled(touch: bool):
        W = torch.empty_like(W0)

        def chunk(rows, _scratch):
            if touch:
                W[rows].zero_()
            fused(W0[rows], W[rows], keep8[rows], lo, hi)

        map_chunks(chunk, W0, 0)

    with torch.no_grad():
        start = time.perf_counter()
        map_chunks(lambda rows, _s: fused(W0[rows], torch.empty(rows.stop - rows.start, args.shape[1]), keep8[rows],
                                          lo, hi), W0, 0, workers=1)
        compile_s = time.perf_counter() - start
        runs = {
            "masked copy (update none)": lambda: masked_copy(W0, keep),
            "EC row step, eager": lambda: energy_compensate_(W0, None, keep, ("row",), (0.8, 1.25)),
            "EC row step, compiled": lambda: compiled(False),
            "the same, pages touched first": lambda: compiled(True),
        }
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    print(f"{args.shape[0]}x{args.shape[1]}, {torch.get_num_threads()} torch threads, medians of {args.repeats}; "
          f"first call (compile) {compile_s:.1f} s\n")
    print(markdown_table(["pass over a fresh output", "s"],
                         [[name, f"{statistics.median(t):.3f}"] for name, t in times.items()], right={1}))


if __name__ == "__main__":
    main()
