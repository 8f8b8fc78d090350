"""How many weights of SmolLM2 tie with the magnitude threshold of their layer (50 %, per layer).

The layer-wide selection (``zpruner.kernels.selection``) keeps top-k's choice among weights
tied at the cut in a layer of fewer than ``TIES_BY_INDEX_MIN`` (2²²) scores, every SmolLM2
layer, because that choice is what the committed results used; longer rows drop the tied
weights in index order. This prints, per linear layer of the first ``--blocks`` blocks, the number
of weights equal to the threshold and how many mask entries an index-order tie-break
would change.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/threshold_ties.py --blocks 2 | tee benchmarks/out/threshold_ties.txt
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=2, help="how many decoder blocks to check")
    args = parser.parse_args()

    import zpruner
    from zpruner.layers import find_blocks, find_matrices

    model, _ = zpruner.load_model(zpruner.ModelConfig(args.model))
    print("| layer | weights | tied with the threshold | entries an index-order tie-break changes |")
    print("|---|---:|---:|---:|")
    for i, block in enumerate(find_blocks(model)[: args.blocks]):
        for name, layer in find_matrices(block).items():
            S = layer.weight.float().abs().reshape(-1)
            k = S.numel() // 2
            keep = torch.ones_like(S, dtype=torch.bool)
            keep[torch.topk(S, k, largest=False, sorted=False).indices] = False
            t = S[~keep].max()
            by_index = S > t  # drop everything below t, then the first tied ones in index order
            tied = torch.nonzero(S == t).reshape(-1)
            need = k - int((S < t).sum())
            by_index[tied[need:]] = True
            print(f"| {i}.{name} | {S.numel()} | {int((S == t).sum())} | {int((keep != by_index).sum())} |")


if __name__ == "__main__":
    main()
