"""SparseGPT's solver in two versions of zpruner's source, in one run: time per layer
shape and pattern, and whether the two give the same bits (hashes of W' and of the mask).

Each measurement is a fresh child process with PYTHONPATH at one source tree; rounds
alternate the trees so that load coming and going on the machine falls on both. Only the
`zpruner.sparsegpt.sparsegpt` call is timed (the factorisation of the Hessian included, its
accumulation not); the Hessian is the layer_runtime.py one (XᵀX of `--tokens` activations
with outlier channels, summed with addmm_), the weights N(0, 1/in), seed 0.

    git archive BEFORE src | tar -x -C /tmp/before    # BEFORE: the commit to compare with
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sparsegpt_solver.py --before /tmp/before/src \
        --json benchmarks/out/sparsegpt_solver.json
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import add_source_trees, environment, markdown_table, run_in_tree, write_json

DEFAULT_CASES = "5120x5120:unstructured,13824x5120:unstructured,4096x4096:2:4,1536x576:unstructured"

CHILD = """
import hashlib, json, math, sys, time, torch
from zpruner.masks import Pattern
from zpruner.sparsegpt import sparsegpt
d_out, d_in, pattern, tokens = int(sys.argv[1]), int(sys.argv[2]), Pattern.parse(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
x = torch.randn(tokens, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g))
H = torch.zeros(d_in, d_in).addmm_(x.t(), x)
del x
start = time.perf_counter()
W_new, keep = sparsegpt(W, H, sparsity=0.5, pattern=pattern)
seconds = time.perf_counter() - start
digest = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
print(json.dumps({"seconds": seconds, "weights": digest(W_new), "mask": digest(keep)}))
"""


def measure(src: Path, case: str, tokens: int) -> dict:
    shape, pattern = case.split(":", 1)
    d_out, d_in = shape.lower().split("x")
    return run_in_tree(src, CHILD, d_out, d_in, pattern, str(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_trees(parser, "sparsegpt.py")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated OUTxIN:PATTERN")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="rounds per version")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    record, rows = [], []
    for case in args.cases.split(","):
        runs = {"before": [], "after": []}
        for round_ in range(args.repeats):
            for name, src in (("before", args.before), ("after", args.after)):
                runs[name].append(measure(src, case, args.tokens))
                print(f"  {case} round {round_ + 1} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
        before = statistics.median(r["seconds"] for r in runs["before"])
        after = statistics.median(r["seconds"] for r in runs["after"])
        same = all((r["weights"], r["mask"]) == (runs["before"][0]["weights"], runs["before"][0]["mask"])
                   for r in runs["before"] + runs["after"])
        rows.append([case, f"{before:.2f}", f"{after:.2f}", f"{before / after:.2f}x", "yes" if same else "**no**"])
        record.append({"case": case, "runs": runs, "median_before_s": before, "median_after_s": after,
                       "same_bits": same})
    print()
    print(markdown_table(["layer:pattern", "before s", "after s", "speed-up", "same W' and mask bits"], rows,
                         right={1, 2, 3}))
    if args.json:
        write_json(args.json, {"benchmark": "sparsegpt_solver", "before": str(args.before), "after": str(args.after),
                               "tokens": args.tokens, "repeats": args.repeats, "environment": environment(),
                               "cases": record})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
