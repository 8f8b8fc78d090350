"""Pruning runtime of one linear layer with the shapes of a LLaMA-2-13B block, per method.

For each shape ([out, in]; default the attention projection 5120 x 5120 and the MLP
up/gate projection 13824 x 5120) and each method, one measurement is the method's whole
per-layer work on random data: accumulating the activation statistics it needs (Σx, Σx²;
XᵀX for SparseGPT) from ``--tokens`` calibration activations, then score + mask + update
(or the SparseGPT solve), float32 on the CPU with the torch thread count of the
environment. Each method is run once to warm up, then ``--repeats`` times; the table
gives medians and the ratio to Wanda measured in the same run, next to the ratios the
statistical-correction paper reports in its Table 3.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layer_runtime.py | tee benchmarks/out/layer_runtime.txt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/layer_runtime.py --shapes 512x512,1384x512 --tokens 256 --repeats 1
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _common import (describe_threads, environment, fmt, markdown_table, parse_methods, parse_shape, prune_config,
                     write_json)

LLAMA2_13B_SHAPES = "5120x5120,13824x5120"
METHODS = "magnitude,wanda,ria,zpruner,cvr,cvr+ec,sparsegpt"
REFERENCE = "wanda"
# Statistical-correction paper, Table 3: pruning time relative to Wanda (its conditions,
# not this machine's; shown only to compare ratios).
PAPER_TABLE3 = {"wanda": 1.0, "sparsegpt": 6.3, "cvr+ec": 1.09}


def random_layer(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """W: [out, in] ~ N(0, 1/in): the spread of a trained LLaMA projection (std ~0.014 at
    in = 5120). Values only matter to SparseGPT, whose Cholesky wants a sane scale."""
    return torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in)


def random_activations(tokens: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """x: [tokens, in]. A few channels get a large scale, as LLM activations have outlier
    features; it keeps XᵀX from being a near-multiple of the identity."""
    scale = torch.exp(torch.randn(d_in, generator=generator))
    return torch.randn(tokens, d_in, generator=generator) * scale


def one_pass(config, W0: torch.Tensor, x: torch.Tensor, batch_tokens: int) -> tuple[float, float, float]:
    """(statistics s, total s, pruned fraction) of one layer's full pruning work.

    Activations are added in batches of ``batch_tokens`` because that is how the engine's
    hooks see them (one block forward per calibration batch).
    """
    from zpruner.pruning import pruned_weights
    from zpruner.stats import ActivationStats

    start = time.perf_counter()
    stats = None
    if config.needs_calibration:
        stats = ActivationStats(W0.shape[1], hessian=config.uses_hessian)
        for batch in x.split(batch_tokens):
            stats.add(batch)
    after_stats = time.perf_counter()
    _, keep = pruned_weights(W0, stats, config)
    end = time.perf_counter()
    return after_stats - start, end - start, 1.0 - keep.float().mean().item()


def bench_shape(shape: tuple[int, int], configs: dict, x: torch.Tensor, args) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    W0 = random_layer(*shape, generator)
    runs = {method: {"stats_s": [], "total_s": [], "pruned_fraction": None} for method in configs}
    for method, config in configs.items():
        print(f"  warm-up {method} ...", flush=True)
        runs[method]["pruned_fraction"] = one_pass(config, W0, x, args.batch_tokens)[2]
    # Round-robin rather than method after method: on a shared machine, load that comes and
    # goes then spreads over all methods instead of inflating one of them.
    for r in range(args.repeats):
        for method, config in configs.items():
            stats_s, total_s, _ = one_pass(config, W0, x, args.batch_tokens)
            runs[method]["stats_s"].append(stats_s)
            runs[method]["total_s"].append(total_s)
            print(f"  repeat {r + 1}/{args.repeats} {method}: {total_s:.3f} s (statistics {stats_s:.3f} s)",
                  flush=True)
    reference = statistics.median(runs[REFERENCE]["total_s"])
    results = []
    for method, run in runs.items():
        median_total = statistics.median(run["total_s"])
        median_stats = statistics.median(run["stats_s"])
        results.append({
            "method": method, **run,
            "median_total_s": median_total, "median_stats_s": median_stats,
            "median_prune_s": median_total - median_stats,
            "ratio_to_wanda": median_total / reference if reference > 0 else None,
            "paper_table3_ratio": PAPER_TABLE3.get(method),
        })
    return results


def table(results: list[dict]) -> str:
    headers = ["method", "median s", "statistics s", "score+mask+update s", "× wanda (here)",
               "× wanda (paper Table 3)"]
    rows = [[r["method"], fmt(r["median_total_s"], 4), fmt(r["median_stats_s"], 4), fmt(r["median_prune_s"], 4),
             fmt(r["ratio_to_wanda"], 2, "x"), fmt(r["paper_table3_ratio"], 2, "x")] for r in results]
    return markdown_table(headers, rows, right={1, 2, 3, 4, 5})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", default=LLAMA2_13B_SHAPES,
                        help="comma-separated OUTxIN weight shapes ([out, in], as nn.Linear stores them)")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (rows of the activations)")
    parser.add_argument("--methods", default=METHODS,
                        help=f"comma-separated; METHOD+UPDATE for an update (cvr+ec); {REFERENCE} is always added")
    parser.add_argument("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured only (N:M fixes it at N/M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after one warm-up")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="activation rows per statistics update (the engine's calibration batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write every timing and the settings here")
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    if min(args.tokens, args.repeats, args.batch_tokens) < 1:
        parser.error("--tokens, --repeats and --batch-tokens must be positive")

    methods = parse_methods(args.methods)
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # every ratio is to Wanda measured in the same run
    fields = {"pattern": args.pattern}
    if args.pattern.strip().lower() == "unstructured":
        fields["sparsity"] = args.sparsity
    configs = {method: prune_config(method, **fields) for method in methods}
    pattern = str(next(iter(configs.values())).parsed_pattern)
    sparsity = next(iter(configs.values())).sparsity

    print(f"# Per-layer pruning runtime, float32 CPU, {args.tokens} calibration tokens, "
          f"{pattern} at {sparsity:.0%}")
    print(describe_threads(), flush=True)
    activations: dict[int, torch.Tensor] = {}  # one activation matrix per input size, shared by all methods
    report = []
    for shape in shapes:
        d_in = shape[1]
        if d_in not in activations:
            activations[d_in] = random_activations(args.tokens, d_in, torch.Generator().manual_seed(args.seed))
        print(f"\nshape {shape[0]} x {shape[1]}:", flush=True)
        results = bench_shape(shape, configs, activations[d_in], args)
        report.append({"shape": list(shape), "results": results})
        print(f"\n## W: {shape[0]} x {shape[1]} ([out, in]), {args.tokens} tokens, {pattern} {sparsity:.0%}, "
              f"median of {args.repeats}\n")
        print(table(results), flush=True)
    print("\nstatistics s: accumulating what the method needs from the activations (Σx, Σx²; XᵀX for sparsegpt);"
          "\nmedian s: statistics + score + mask + update (or the SparseGPT solve), one layer.")

    if args.json:
        write_json(args.json, {
            "benchmark": "layer_runtime",
            "settings": {"shapes": [list(s) for s in shapes], "tokens": args.tokens, "methods": methods,
                         "pattern": pattern, "sparsity": sparsity, "repeats": args.repeats,
                         "batch_tokens": args.batch_tokens, "seed": args.seed, "dtype": "float32", "device": "cpu"},
            "environment": environment(),
            "shapes": report,
        })
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
