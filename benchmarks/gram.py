"""XᵀX of one calibration batch: the whole-matrix ``addmm_`` against ``zpruner.gram``'s
upper panels (each on one torch thread, the threads side by side), by input width d and
panel height; whether the panels give the whole product's bits (two accumulated batches
of random data, the second onto a non-zero sum, compared bit for bit), and the time of
one batch (median of ``--repeats``, each after a warm-up).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gram.py

d: 576 and 1536 are SmolLM2-135M's inputs (attention and MLP up, down_proj), 4096 and
11008 LLaMA-2-7B's. tokens: the engine's calibration batch, 8 x 512.
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from _common import markdown_table


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="576,1536,4096", help="comma-separated input widths d")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rows", default="64,128,192,256,384", help="panel heights to try")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from zpruner import gram

    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(0))
        acc = torch.zeros(d, d)
        whole = seconds(lambda: acc.addmm_(x.t(), x), args.repeats)
        table.append([d, "whole addmm_", "-", "-", f"{whole * 1e3:.1f}", "1.00"])
        for rows in rows_list:
            with mock.patch.object(gram, "PANEL_ROWS", rows):
                edges = gram.panel_edges(d)
                if edges is None:
                    continue
                gram.agrees.cache_clear()
                same = gram.agrees(args.tokens, d, torch.get_num_threads())
                t = seconds(lambda: gram.add_upper(acc, x, edges), args.repeats)
            default = " (default)" if rows == gram.PANEL_ROWS else ""
            table.append([d, f"panels of >= {rows} rows{default}", len(edges) - 1, "yes" if same else "**no**",
                          f"{t * 1e3:.1f}", f"{t / whole:.2f}"])
    gram.agrees.cache_clear()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, tokens {args.tokens}\n")
    print(markdown_table(["d", "XᵀX of one batch", "panels", "bits of addmm_", "ms", "x whole"], table))


if __name__ == "__main__":
    main()
