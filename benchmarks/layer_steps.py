"""Where one layer's pruning time goes: score, mask and update timed apart, per method.

The data of layer_runtime.py (W ~ N(0, 1/in), statistics of 2048 activations with
outlier channels, seed 0); each method runs the three steps of
``zpruner.pruning.pruned_weights`` for a score-based method, round-robin over the methods
so that load on the machine falls on all of them; the first round warms up and the table
gives medians of the rest.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layer_steps.py --shape 13824x5120 \
        --methods wanda,cvr,cvr+ec,zpruner,ria,magnitude | tee benchmarks/out/layer_steps.txt
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import markdown_table, parse_methods, parse_shape, prune_config
from layer_runtime import random_activations, random_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default="13824x5120", help="OUTxIN")
    parser.add_argument("--methods", default="wanda,cvr,cvr+ec,zpruner",
                        help="score-based methods, METHOD+UPDATE for an update")
    parser.add_argument("--repeats", type=int, default=5, help="rounds after the warm-up")
    args = parser.parse_args()
    from zpruner.masks import keep_mask
    from zpruner.stats import ActivationStats

    d_out, d_in = args.shape
    g = torch.Generator().manual_seed(0)
    W0, x = random_layer(d_out, d_in, g), random_activations(2048, d_in, g)
    stats = ActivationStats(d_in)
    stats.add(x)
    configs = {m: prune_config(m) for m in parse_methods(args.methods)}
    solvers = [m for m, c in configs.items() if c.method_entry.kind == "solver"]
    if solvers:
        parser.error(f"--methods: {', '.join(solvers)} choose their mask inside a solve; "
                     "time them with layer_runtime.py")
    times: dict[str, list[tuple[float, float, float]]] = {m: [] for m in configs}
    for round_ in range(args.repeats + 1):
        for name, config in configs.items():
            method = config.method_entry
            steps = []
            start = time.perf_counter()
            score = method(W0, stats, constants=config.constants)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            keep = keep_mask(score, config.sparsity, config.parsed_pattern, config.group or method.default_group)
            steps.append(time.perf_counter() - start)
            del score
            start = time.perf_counter()
            config.update_entry(W0, None, keep, stats, constants=config.constants)
            steps.append(time.perf_counter() - start)
            if round_:
                times[name].append(tuple(steps))
    rows = []
    for name, runs in times.items():
        med = [statistics.median(run[i] for run in runs) for i in range(3)]
        rows.append([name, *(f"{t:.3f}" for t in med), f"{sum(med):.3f}"])
    print(f"{args.shape}, {torch.get_num_threads()} torch threads, medians of {args.repeats}\n")
    print(markdown_table(["method", "score s", "mask s", "update s", "sum s"], rows, right={1, 2, 3, 4}))


if __name__ == "__main__":
    main()
