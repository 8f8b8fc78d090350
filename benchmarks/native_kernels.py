"""zpruner's compiled SparseGPT column loop (src/zpruner/kernels/sparsegpt_kernel.c, built
by zpruner.kernels.native) against the eager torch loop it replaces, on LLaMA-2-13B-shaped
layers: time, and whether the results move.

- SparseGPT (50 % adaptive mask, and 2:4 chosen in the loop, on the layer_runtime.py data:
  2048 activations with outlier channels): the compiled column loop must give the same
  bits, W' and mask. With 2:4 the kernel runs once per group of 4 columns (fused=True
  forces it; zpruner's default keeps the torch loop there).
(EC's kernel, measured here before, was removed: its float64 sums gave other weights than
the eager passes.) Also the time to build the kernel into an empty cache (the first use on
a machine).
Medians of ``--repeats``, eager and compiled interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/native_kernels.py | tee benchmarks/out/native_kernels.txt
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from _common import environment, markdown_table, parse_shape, write_json
from layer_runtime import random_activations, random_layer


def build_seconds() -> float:
    from zpruner.kernels import native, sparsegpt_columns

    with tempfile.TemporaryDirectory() as cache:
        before = os.environ.get("ZPRUNER_CACHE")
        os.environ["ZPRUNER_CACHE"] = cache
        native._loaded.cache_clear()
        try:
            start = time.perf_counter()
            if native.load(*sparsegpt_columns._KERNEL) is None:
                raise SystemExit("the kernel did not build here: see the zpruner.kernels.native log (no C compiler?)")
            return time.perf_counter() - start
        finally:
            native._loaded.cache_clear()
            if before is None:
                del os.environ["ZPRUNER_CACHE"]
            else:
                os.environ["ZPRUNER_CACHE"] = before


def timed(runs: dict, repeats: int) -> tuple[dict, dict]:
    """(median seconds, last result) per run name, the runs interleaved."""
    times = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="5120x5120,13824x5120", help="comma-separated OUTxIN")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write every figure and the settings here")
    args = parser.parse_args()
    from zpruner.masks import Pattern
    from zpruner.sparsegpt import sparsegpt
    from zpruner.stats import ActivationStats

    build_s = build_seconds()
    rows, records = [], []
    for shape in (parse_shape(s) for s in args.shapes.split(",")):
        W0 = random_layer(*shape, torch.Generator().manual_seed(1))
        stats = ActivationStats(shape[1], hessian=True)
        stats.add(random_activations(2048, shape[1], torch.Generator().manual_seed(0)))
        name = f"{shape[0]}x{shape[1]}"
        record = {"shape": name}
        for label, pattern in (("50 %", Pattern()), ("2:4", Pattern(2, 4))):
            sg, sg_out = timed({f: (lambda f=f: sparsegpt(W0, stats.xtx, sparsity=0.5, pattern=pattern, fused=f))
                                for f in (False, True)}, args.repeats)
            same = all(torch.equal(a, b) for a, b in zip(sg_out[False], sg_out[True]))
            rows.append([name, f"SparseGPT solve, {label}", f"{sg[False]:.3f}", f"{sg[True]:.3f}",
                         f"{sg[False] / sg[True]:.2f}x", "same bits (W' and mask)" if same else "BITS DIFFER"])
            record[f"sparsegpt_{label}"] = {"s": {str(k): v for k, v in sg.items()}, "same_bits": same}
        records.append(record)
    print(f"{torch.get_num_threads()} torch threads, medians of {args.repeats}; "
          f"the kernel built into an empty cache in {build_s:.1f} s\n")
    print(markdown_table(["shape", "work", "eager s", "kernel s", "speed-up", "results"], rows, right={2, 3, 4}))
    if args.json:
        write_json(args.json, {"environment": environment(), "build_s": build_s, "repeats": args.repeats,
                               "results": records})


if __name__ == "__main__":
    main()
