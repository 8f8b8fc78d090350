"""SparseGPT's solver (`zpruner.sparsegpt.sparsegpt`, adaptive mask at 50 %) on one torch
thread against torch's threads, per layer shape, in one run: the rounds alternate the two
settings so that load coming and going on the machine falls on both.

The Hessian is XᵀX of `--tokens` N(0, 1) activations, the weights N(0, 1/in); only the
solver call is timed (the inverse-Hessian factorisation included, the XᵀX accumulation
not). Prints a Markdown table of medians and writes every timing to --json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sparsegpt_threads.py --json /tmp/sgpt_threads.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import environment, markdown_table, write_json

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
        d_out, d_in = (int(x) for x in shape.lower().split("x"))
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        X = torch.randn(args.tokens, d_in, generator=gen)
        H = X.T @ X
        del X
        times: dict[int, list[float]] = {n: [] for n in settings}
        for round_ in range(args.repeats + 1):
            for n in settings:
                torch.set_num_threads(n)
                start = time.perf_counter()
                sparsegpt(W, H, sparsity=0.5)
                if round_:  # the first round warms up
                    times[n].append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append([f"{d_out} x {d_in}", *(f"{med[n]:.3f}" for n in settings),
                     f"{med[1] / med[settings[-1]]:.2f}x"])
        record.append({"shape": [d_out, d_in], "seconds": {str(n): t for n, t in times.items()}})
        print(rows[-1], flush=True)
    print(markdown_table(["shape", *(f"{n} thread{'s' if n > 1 else ''} s" for n in settings), "speed-up"], rows,
                         right=set(range(1, len(settings) + 2))))
    if args.json:
        write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "environment": environment(),
                               "results": record})


if __name__ == "__main__":
    main()
