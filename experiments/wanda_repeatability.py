"""Does one Wanda prune of a fixed LLaMA-shaped layer give the same bits in every fresh
process? And if not, at which step do two processes part?

benchmarks/method_versions.py saw a few of its Wanda child runs (3 of 12 in one run, 4 of 96
in another) with another mask hash than the rest, the same other hash for both code versions. This
runs the same child (same W, same activations, seed 0) ``--runs`` times, each a fresh
Python, and hashes every step on the way: W, the activations, the statistics' Σx², the
score, and the mask and W' of three pruned_weights calls in the process. A step whose
hash differs between processes while the steps before it agree is where the difference
enters. Output: the distinct hash tuples with their counts, and the log of every run.
Its runs are in out/wanda_repeatability.txt (200 processes, one tuple per shape; then
``--split-inputs``: one process of 48 whose first torch.exp gave other values, so other
activations; experiments/README.md).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/wanda_repeatability.py --runs 150 \
        | tee experiments/out/wanda_repeatability.txt
    OMP_NUM_THREADS=2 .venv/bin/python experiments/wanda_repeatability.py --runs 50 --shape 13824x5120 \
        | tee -a experiments/out/wanda_repeatability.txt
    OMP_NUM_THREADS=2 .venv/bin/python experiments/wanda_repeatability.py --runs 48 --shape 13824x5120 \
        --method wanda,zpruner,cvr,cvr+ec --split-inputs | tee -a experiments/out/wanda_repeatability.txt
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

CHILD = """
import hashlib, json, math, sys, torch
sys.path.insert(0, sys.argv[4])
from _common import prune_config
from zpruner import scores
from zpruner.pruning import pruned_weights
from zpruner.stats import ActivationStats
d_out, d_in, method, split = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[5] == "1"
digest = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]
g = torch.Generator().manual_seed(0)
W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
normal, spread = torch.randn(2048, d_in, generator=g), torch.randn(d_in, generator=g)
x = normal * torch.exp(spread)
config = prune_config(method, sparsity=0.5)
stats = ActivationStats(d_in, hessian=config.uses_hessian)
stats.add(x)
steps = {"W": digest(W), **({"randn": digest(normal), "exp": digest(torch.exp(spread))} if split else {}),
         "x": digest(x), "sumsq": digest(stats.sumsq),
         "score": digest(scores.wanda(W, stats)) if method == "wanda" else None}
del x, normal
for call in range(3):
    W_new, keep = pruned_weights(W, stats, config)
    steps[f"mask{call}"], steps[f"W'{call}"] = digest(keep), digest(W_new)
print(json.dumps(steps))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--shape", default="5120x5120", help="OUTxIN")
    parser.add_argument("--method", default="wanda",
                        help="comma-separated: the runs cycle through them, as method_versions does")
    parser.add_argument("--split-inputs", action="store_true",
                        help="hash the activations' randn and exp apart too (which op makes other inputs)")
    parser.add_argument("--src", type=Path, default=PROJECT / "src", help="zpruner source tree to run")
    parser.add_argument("--log", type=Path, help="append every run's hashes here (JSON lines)")
    args = parser.parse_args()
    d_out, d_in = args.shape.lower().split("x")
    env = {**os.environ, "PYTHONPATH": str(args.src)}
    methods = args.method.split(",")
    seen = {method: collections.Counter() for method in methods}
    for run in range(args.runs):
        method = methods[run % len(methods)]
        out = subprocess.run([sys.executable, "-c", CHILD, d_out, d_in, method, str(PROJECT / "benchmarks"),
                              "1" if args.split_inputs else "0"],
                             env=env, capture_output=True, text=True, check=True).stdout
        steps = json.loads(out.splitlines()[-1])
        seen[method][json.dumps(steps, sort_keys=False)] += 1
        if args.log:
            with args.log.open("a") as log:
                log.write(json.dumps({"run": run, "shape": args.shape, "method": method, **steps}) + "\n")
        print(f"run {run + 1}/{args.runs} ({method}): {len(seen[method])} distinct", flush=True)
    for method in methods:
        print(f"\n{method} {args.shape}, {sum(seen[method].values())} fresh processes, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}:")
        tuples = [(json.loads(key), count) for key, count in seen[method].most_common()]
        common = tuples[0][0]
        for steps, count in tuples:
            first = next((step for step in steps if steps[step] != common[step]), None)
            print(f"  {count:4d} x {' '.join(f'{k}={v}' for k, v in steps.items())}"
                  + (f"  <- first differs at {first}" if first else ""))


if __name__ == "__main__":
    main()
