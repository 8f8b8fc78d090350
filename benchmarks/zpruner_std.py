"""Z-Pruner's matrix std (``reductions.matrix_std``): how often its fast sum decides the float32
std, and what one std costs, against the sequential sum alone (``fast=False``), on the two
standardised matrices of Z-Pruner's score (W divided by its row norms, by its column norms)
for random LLaMA-2-13B-shaped layers W ~ N(0, 1/in). Every result is checked to be the
sequential sum's bits.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/zpruner_std.py | tee benchmarks/out/zpruner_std.txt
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _common import markdown_table, parse_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="13824x5120,5120x5120", help="comma-separated OUTxIN")
    parser.add_argument("--seeds", type=int, default=12, help="random layers per shape")
    args = parser.parse_args()
    from zpruner.kernels import reductions

    cumsum = torch.cumsum
    sequential_runs = [0]

    def counting_cumsum(*a, **k):  # the sequential sum is the only cumulative sum in matrix_std
        sequential_runs[0] += 1
        return cumsum(*a, **k)

    rows = []
    for shape in map(parse_shape, args.shapes.split(",")):
        decided, fast_s, both_s, sequential_s = 0, [], [], []
        for seed in range(args.seeds):
            W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[1])
            for X in (W / W.norm(dim=1, keepdim=True), W / W.norm(dim=0, keepdim=True)):
                mean = reductions.matrix_mean(X)
                start = time.perf_counter()
                expected = reductions.matrix_std(X, mean, fast=False)
                sequential_s.append(time.perf_counter() - start)
                before = sequential_runs[0]
                torch.cumsum = counting_cumsum
                try:
                    start = time.perf_counter()
                    got = reductions.matrix_std(X, mean)
                    elapsed = time.perf_counter() - start
                finally:
                    torch.cumsum = cumsum
                assert torch.equal(got, expected), (shape, seed)
                if sequential_runs[0] == before:
                    decided += 1
                    fast_s.append(elapsed)
                else:
                    both_s.append(elapsed)
        total = len(sequential_s)
        rows.append([f"{shape[0]}x{shape[1]}", f"{decided} of {total}",
                     f"{statistics.median(fast_s) * 1e3:.1f}" if fast_s else "-",
                     f"{statistics.median(both_s) * 1e3:.1f}" if both_s else "-",
                     f"{statistics.median(sequential_s) * 1e3:.1f}",
                     f"{statistics.mean(fast_s + both_s) * 1e3:.1f}"])
    print(f"{torch.get_num_threads()} torch threads; every std equal to the sequential sum's\n")
    print(markdown_table(["W", "fast sum decides", "then ms", "else (both) ms", "sequential only ms",
                          "mean ms"], rows, right={2, 3, 4, 5}))


if __name__ == "__main__":
    main()
