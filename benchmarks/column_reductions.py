"""Column reductions of a weight matrix, torch's kernel against zpruner's same-bits fast
paths: ``W.norm(dim=0)`` against ``columns.column_norm`` (Z-Pruner) and
``W.var(dim=0, unbiased=False)`` against ``columns.column_variance`` (CVR), float32 on the
CPU, on the shapes of a LLaMA-2-13B block and a SmolLM2 MLP. Each time is the median of
``--repeats`` runs; every result is checked to be torch's bits.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/column_reductions.py | tee benchmarks/out/column_reductions.txt
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _common import environment, fmt, markdown_table, parse_shape, write_json

SHAPES = "5120x5120,13824x5120,1536x576"


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    from zpruner.kernels.columns import column_norm, column_variance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated OUTxIN")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    pairs = {"norm": (lambda W: W.norm(dim=0), column_norm),
             "variance": (lambda W: W.var(dim=0, unbiased=False), column_variance)}
    results = []
    for text in args.shapes.split(","):
        d_out, d_in = parse_shape(text)
        W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0)) / math.sqrt(d_in)
        for name, (reference, fast) in pairs.items():
            torch_s, expected = median_time(lambda: reference(W), args.repeats)
            fast_s, got = median_time(lambda: fast(W), args.repeats)
            if not torch.equal(got, expected):
                raise SystemExit(f"{name} of {text}: not torch's bits")
            results.append({"shape": [d_out, d_in], "reduction": name, "torch_s": torch_s, "zpruner_s": fast_s,
                            "speedup": torch_s / fast_s})
            print(f"{text} {name}: torch {torch_s:.4f} s, zpruner {fast_s:.4f} s", flush=True)
    rows = [[f"{r['shape'][0]} x {r['shape'][1]}", r["reduction"], fmt(r["torch_s"], 4), fmt(r["zpruner_s"], 4),
             fmt(r["speedup"], 1, "x")] for r in results]
    print(markdown_table(["W [out, in]", "column", "torch s", "zpruner s (same bits)", "speed-up"], rows,
                         right={2, 3, 4}))
    if args.json:
        write_json(args.json, {"benchmark": "column_reductions", "settings": vars(args),
                               "environment": environment(), "results": results})


if __name__ == "__main__":
    main()
