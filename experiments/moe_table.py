"""The tables of docs/moe.md from the mixture-of-experts sweeps' results: WikiText-2
perplexity of SmolLM2 upcycled into 4 experts (experiments/upcycle.py), its experts pruned on
their own tokens against statistics pooled over all of a block's tokens, with the sparsity
of every block weight counted from the weights; and the expert-removal criteria.

    .venv/bin/python experiments/moe_table.py experiments/out/moe.jsonl experiments/out/moe_criteria.jsonl \
        --smollm2 experiments/out/reconstruction.jsonl experiments/out/quick_table.jsonl

SmolLM2's column takes the first line of those files with the same method, pattern and 50 %
on C4 calibration and default settings otherwise (the Wanda lines ran one calibration window
per block forward, the upcycled runs 8: the same method, other float rounding).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ppl(result: dict) -> float | None:
    return (result.get("perplexity_protocol") or {}).get("value")


def prune_of(result: dict) -> dict:
    return result["config"].get("prune") or {}


def cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    sparsity = result["sparsity"]
    return f"{ppl(result):.2f} ({100 * sparsity.get('all_block_weights', sparsity['overall']):.2f} %)"


def is_plain(result: dict) -> bool:
    """50 % or 2:4 on C4 calibration, no update, uniform allocation, nothing selected."""
    p = prune_of(result)
    return not p or (p.get("sparsity") == 0.5 and p.get("calibration") == "c4" and p.get("update") == "none"
                     and p.get("allocation", "uniform") == "uniform" and not p.get("select")
                     and not p.get("group"))


def pruning_table(results: list[dict]) -> str:
    """Method x pattern: the upcycled model with own and pooled expert statistics, and SmolLM2
    pruned the same way: perplexity (zeros of all block weights)."""
    upcycled = [r for r in results if "moe" in r["config"]["model"]["name"]]
    smollm2 = [r for r in results if r["config"]["model"]["name"] == "smollm2-135m" and is_plain(r)]
    rows = ["| method | pattern | upcycled, own tokens | upcycled, pooled tokens | SmolLM2 |", "|---|---|---:|---:|---:|"]
    methods = dict.fromkeys(prune_of(r)["method"] for r in upcycled if r["config"].get("prune"))
    for method in methods:
        for pattern in ("unstructured", "2:4"):
            found = {}
            for r in upcycled:
                p = prune_of(r)
                if p.get("method") == method and p.get("pattern") == pattern:
                    found[p.get("expert_stats", "own")] = r
            dense = next((r for r in smollm2 if prune_of(r).get("method") == method
                          and prune_of(r).get("pattern") == pattern), None)
            label = "50 %" if pattern == "unstructured" else pattern
            rows.append(f"| {method} | {label} | {cell(found.get('own'))} | {cell(found.get('pooled'))} | {cell(dense)} |")
    head = []
    for name, group in (("upcycled model", upcycled), ("SmolLM2", smollm2)):
        dense = next((r for r in group if not r["config"].get("prune")), None)
        if dense is not None:
            head.append(f"Dense {name}: {ppl(dense):.6f}")
    return "\n".join(head) + "\n\n" + "\n".join(rows)


def criteria_table(results: list[dict]) -> str:
    """Removed experts x criterion: perplexity, and the share of the blocks' original weights gone."""
    base = [r for r in results if r["config"]["model"]["name"].endswith("wanda50")]
    dense = next((r for r in base if not r["config"].get("prune")), None)
    rows = ["| experts removed | reap | frequency | random |", "|---|---:|---:|---:|"]
    for fraction in (0.25, 0.5):
        cells = []
        for score in ("reap", "frequency", "random"):
            r = next((r for r in base if prune_of(r).get("prune_experts") == fraction
                      and prune_of(r).get("expert_score") == score), None)
            cells.append("not run" if r is None else
                          f"{ppl(r):.2f} ({100 * r['sparsity']['removed_with_experts']:.1f} % gone)")
        rows.append(f"| {round(fraction * 4)} of 4 | " + " | ".join(cells) + " |")
    check = next((r for r in results if not r["config"]["model"]["name"].endswith("wanda50")
                  and prune_of(r).get("prune_experts") == 0.5), None)
    lines_ = []
    if check is not None:
        lines_.append(f"Dense upcycled model with 2 of its 4 identical experts removed: {ppl(check):.4f}")
    if dense is not None:
        lines_.append(f"Its experts pruned to 50 % with Wanda on their own tokens, no expert removed: {ppl(dense):.2f} "
                      f"({100 * dense['sparsity']['all_block_weights']:.2f} % of the block weights zero)")
    return "\n\n".join(lines_ + ["\n".join(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pruning", help="the results of experiments/moe.toml")
    parser.add_argument("criteria", nargs="?", help="the results of experiments/moe_criteria.toml")
    parser.add_argument("--smollm2", nargs="*", default=[], help="results files with SmolLM2 runs to set beside")
    args = parser.parse_args()
    print(pruning_table(lines(args.pruning) + [r for path in args.smollm2 for r in lines(path)]))
    if args.criteria:
        print()
        print(criteria_table(lines(args.criteria)))


if __name__ == "__main__":
    main()
