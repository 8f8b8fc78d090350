"""One layer's pruning in two versions of zpruner's source, in one run: time per method and
shape, each version's ratio to Wanda, and whether the two give the same bits (hashes of
W' and of the mask).

Each measurement is a fresh child process with PYTHONPATH at one source tree, timing
``zpruner.pruning.pruned_weights`` (score + mask + update, or the SparseGPT solve) on the
layer_runtime.py data: W ~ N(0, 1/in), statistics of 2048 activations with outlier
channels, seed 0. Rounds alternate the trees, and each round runs every method, so load
coming and going on the machine falls on both versions and on Wanda alike. Each child
also records the CPU it ran on and torch's kernel level there (AVX2, AVX512): the bits
depend on them. "Same bits" compares the runs whose inputs (hashes of W and the
activations) are the usual ones; runs given other inputs are left out of it and listed
after the table, as is any run whose bits differ, with where the difference entered.

    git archive BEFORE src | tar -x -C /tmp/before    # BEFORE: the commit to compare with
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/method_versions.py --before /tmp/before/src \
        | tee benchmarks/out/method_versions.txt
"""
from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

from _common import add_source_trees, environment, markdown_table, parse_methods, run_in_tree, write_json

HERE = Path(__file__).resolve().parent
SHAPES = "5120x5120,13824x5120"
METHODS = "wanda,zpruner,cvr,cvr+ec"

CHILD = """
import hashlib, json, math, sys, time, torch
sys.path.insert(0, sys.argv[4])
from _common import prune_config
from zpruner.pruning import pruned_weights
from zpruner.stats import ActivationStats
d_out, d_in, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
g = torch.Generator().manual_seed(0)
W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
x = torch.randn(2048, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g))
config = prune_config(method, sparsity=0.5)
stats = ActivationStats(d_in, hessian=config.uses_hessian)
stats.add(x)
inputs, sums = digest(W, x), digest(stats.sum, stats.sumsq)
del x
pruned_weights(W, stats, config)  # warm-up: first-use costs (thread pools, allocator) out of the timing
start = time.perf_counter()
W_new, keep = pruned_weights(W, stats, config)
seconds = time.perf_counter() - start
model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
print(json.dumps({"seconds": seconds, "weights": digest(W_new), "mask": digest(keep), "inputs": inputs, "sums": sums,
                  "cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def measure(src: Path, shape: str, method: str) -> dict:
    d_out, d_in = shape.lower().split("x")
    return run_in_tree(src, CHILD, d_out, d_in, method, str(HERE))


def compare_bits(runs: list[dict]) -> tuple[bool, list[str]]:
    """(whether every run given the usual inputs gave the same W' and mask, a note for each
    run that did not). The usual inputs are the most frequent hash of W and the activations:
    on the Intel machine of 2026-12-06, torch's seeded randn/exp in the child now and then
    gave other inputs (2 of 48 children), a difference zpruner's code never saw."""
    usual = collections.Counter(r.get("inputs") for r in runs).most_common(1)[0][0]
    reference = next(r for r in runs if r.get("inputs") == usual)
    same, notes = True, []
    for run in runs:
        if run.get("inputs") != usual:
            notes.append(f"{run['label']}: other inputs (W, activations), left out")
        elif (run["weights"], run["mask"]) != (reference["weights"], reference["mask"]):
            same = False
            where = "the activation sums" if run.get("sums") != reference.get("sums") else "the pruning itself"
            notes.append(f"{run['label']}: same inputs, other bits (mask {run['mask']}), from {where}")
    return same, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_trees(parser, "pruning.py")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated OUTxIN")
    parser.add_argument("--methods", default=METHODS, help="comma-separated; wanda is added as the reference")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per version")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    methods = parse_methods(args.methods)
    methods = methods if "wanda" in methods else ["wanda", *methods]

    record, rows, odd = [], [], []
    for shape in args.shapes.split(","):
        runs = {(version, method): [] for version in ("before", "after") for method in methods}
        for round_ in range(args.repeats):
            for version, src in (("before", args.before), ("after", args.after)):
                for method in methods:
                    runs[version, method].append({"label": f"{version} round {round_ + 1}",
                                                  **measure(src, shape, method)})
                    print(f"  {shape} round {round_ + 1} {version} {method}: "
                          f"{runs[version, method][-1]['seconds']:.3f} s", flush=True)
        median = {key: statistics.median(r["seconds"] for r in value) for key, value in runs.items()}
        for method in methods:
            before, after = median["before", method], median["after", method]
            results = runs["before", method] + runs["after", method]
            same, notes = compare_bits(results)
            odd += [f"{shape} {method}, {note}" for note in notes]
            ratios = [median[version, method] / median[version, "wanda"] for version in ("before", "after")]
            rows.append([shape, method, f"{before:.3f}", f"{after:.3f}", f"{before / after:.2f}x",
                         f"{ratios[0]:.2f}x", f"{ratios[1]:.2f}x", "yes" if same else "**no**"])
            record.append({"shape": shape, "method": method, "median_before_s": before, "median_after_s": after,
                           "ratio_to_wanda_before": ratios[0], "ratio_to_wanda_after": ratios[1],
                           "same_bits": same, "runs_before": runs["before", method],
                           "runs_after": runs["after", method]})
    print()
    print(markdown_table(["W [out, in]", "method", "before s", "after s", "speed-up", "before × wanda",
                          "after × wanda", "same W' and mask bits"], rows, right={2, 3, 4, 5, 6}))
    for line in odd:
        print(line)
    if args.json:
        write_json(args.json, {"benchmark": "method_versions", "before": str(args.before), "after": str(args.after),
                               "repeats": args.repeats, "environment": environment(), "results": record})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
