"""Peak memory and time of a whole-layer selection: torch.topk against ``masks.drop_lowest``.

Each way runs in a child process of its own, so each peak (VmHWM) is its own; the scores
are made in place, so the peak above them is the selection's. Default: one LLaMA-2-13B
MLP projection (13824 x 5120) of |N(0, 1/5120)| scores at 50 %, which ties at the cut
like the float32 weights of ``layer_runtime.py`` (about three scores per float32 value
around the median).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/selection_memory.py | tee benchmarks/out/selection_memory.txt
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import parse_shape, vm_hwm_mib


def child(way: str, n: int, sparsity: float) -> dict:
    import torch

    from zpruner.masks import drop_lowest

    scores = torch.empty(1, n).normal_(generator=torch.Generator().manual_seed(0)).abs_()
    k = int(sparsity * n)
    before = vm_hwm_mib()
    start = time.perf_counter()
    if way == "topk":
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, False)
    else:
        keep = drop_lowest(scores, k)
    seconds = time.perf_counter() - start
    peak = vm_hwm_mib() - before  # before the checks below, which index half the scores
    t = scores[~keep].max()
    return {"way": way, "scores": n, "seconds": seconds, "peak_above_scores_mib": peak,
            "dropped": int((~keep).sum()), "tied_with_the_cut": int((scores == t).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default="13824x5120", help="out x in of the layer")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if vm_hwm_mib() is None:
        sys.exit("selection_memory.py reads VmHWM from /proc/self/status: Linux only")
    rows, cols = args.shape
    if args.child:
        print(json.dumps(child(args.child, rows * cols, args.sparsity)))
        return
    print(f"| selection of {rows}x{cols} scores at {args.sparsity:.0%} | s | peak above the scores, MiB | dropped | tied with the cut |")
    print("|---|---:|---:|---:|---:|")
    for way in ("topk", "drop_lowest"):
        out = subprocess.run([sys.executable, __file__, "--child", way, "--shape", f"{rows}x{cols}",
                              "--sparsity", str(args.sparsity)], check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"| {way} | {r['seconds']:.2f} | {r['peak_above_scores_mib']:.0f} | {r['dropped']} | {r['tied_with_the_cut']} |")


if __name__ == "__main__":
    main()
