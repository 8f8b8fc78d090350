"""SparseGPT's solver (`zpruner.sparsegpt.sparsegpt`, adaptive mask at 50 %) on one torch
thread against torch's threads, per layer shape, in one run: the rounds alternate the two
settings so that load coming and going on the machine falls on both.

The Hessian is XᵀX of `--tokens` N(0, 1) activations, the weights N(0, 1/in); only the
solver call is timed (the inverse-Hessian factorisation included, the XᵀX accumulation
not). Prints a Markdown table of medians, whether the two settings gave the same mask
and the same weights (they need not: the factorisation rounds differently on more
threads, and the adaptive mask follows), and writes every timing to
--json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sparsegpt_threads.py --json benchmarks/out/sparsegpt_threads.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import environment, markdown_table, parse_shape, write_json

# [out, in]: SmolLM2-135M's attention and MLP layers, LLaMA-2-7B's attention, LLaMA-2-13B's
# attention and gate/up (layer_runtime.py's shapes)
DEFAULT_SHAPES = "576x576,1536x576,576x1536,4096x4096,5120x5120,13824x5120"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="rounds per setting (after one warm-up)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from zpruner.sparsegpt import sparsegpt

    threads = torch.get_num_threads()
    settings = [1, threads] if threads > 1 else [1]
    rows, record = [], []
    for shape in args.shapes.split(","):
        d_out, d_in = parse_shape(shape)
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        X = torch.randn(args.tokens, d_in, generator=gen)
        H = X.T @ X
        del X
        times: dict[int, list[float]] = {n: [] for n in settings}
        results = {}
        for round_ in range(args.repeats + 1):
            for n in settings:
                torch.set_num_threads(n)
                start = time.perf_counter()
                results[n] = sparsegpt(W, H, sparsity=0.5)
                if round_:  # the first round warms up
                    times[n].append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        (W1, keep1), (Wn, keepn) = results[1], results[settings[-1]]
        same_mask, same_weights = torch.equal(keep1, keepn), torch.equal(W1, Wn)
        del results, W1, Wn, keep1, keepn
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append([f"{d_out} x {d_in}", *(f"{med[n]:.3f}" for n in settings),
                     f"{med[1] / med[settings[-1]]:.2f}x", str(same_mask), str(same_weights)])
        record.append({"shape": [d_out, d_in], "seconds": {str(n): t for n, t in times.items()},
                       "same_mask": same_mask, "same_weights": same_weights})
        print(rows[-1], flush=True)
    print(markdown_table(["shape", *(f"{n} thread{'s' if n > 1 else ''} s" for n in settings), "speed-up",
                          "same mask", "same weights"], rows,
                         right=set(range(1, len(settings) + 2))))
    if args.json:
        write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "environment": environment(),
                               "results": record})


if __name__ == "__main__":
    main()
