"""Table 1 (quick protocol) from the sweep's results, the papers' orderings checked on it,
and every cell compared with the earlier measurement (one results JSON per cell in
experiments/quick_table/, written by the former experiments/quick_table.py).

Read-only: it runs nothing. Cells are matched by run key (zpruner.sweep.run_key of each
result's config). Acceptance: magnitude, Wanda, RIA, Z-Pruner, CVR and dense
equal to the printed digits (2 decimals); SparseGPT within 1 % (its float32 noise).
Exit status 1 if a cell is missing or fails. Usage, from the repository root:

    .venv/bin/python experiments/quick_table_check.py | tee experiments/out/quick_table_check.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zpruner.sweep import run_key

HERE = Path(__file__).resolve().parent
METHODS = ["magnitude", "wanda", "sparsegpt", "ria", "zpruner", "cvr"]
UPDATES = ["none", "ec"]
PATTERNS = ["50 %", "4:8", "2:4"]
FILE_PATTERN = {"50 %": "50", "4:8": "4of8", "2:4": "2of4"}
NOISY = {"sparsegpt": 0.01}  # relative tolerance; every other method: equal to 2 decimals


def cell_of(config: dict) -> tuple[str, str, str]:
    prune = config.get("prune")
    if prune is None:
        return ("dense", "-", "50 %")  # printed in the first column
    pattern = "50 %" if prune["pattern"] == "unstructured" else prune["pattern"]
    return (prune["method"], prune.get("update", "none"), pattern)


def ppl(result: dict) -> float:
    return result["perplexity_protocol"]["value"]


def load_jsonl(path: Path) -> dict[str, dict]:
    return {run_key(r["config"]): r for r in map(json.loads, path.read_text().splitlines()) if r}


def load_dir(path: Path) -> dict[str, dict]:
    return {run_key(r["config"]): r for r in (json.loads(p.read_text()) for p in sorted(path.glob("*.json")))}


def table(by_cell: dict[tuple, dict]) -> list[str]:
    def fmt(cell):
        return f"{ppl(by_cell[cell]):.2f}" if cell in by_cell else "-"

    lines = ["| method | update | 50 % | 4:8 | 2:4 |", "|---|---|---:|---:|---:|",
             f"| dense | - | {fmt(('dense', '-', '50 %'))} | | |"]
    for method in METHODS:
        for update in UPDATES:
            lines.append(f"| {method} | {update} | " + " | ".join(fmt((method, update, p)) for p in PATTERNS) + " |")
    return lines


def orderings(by_cell: dict[tuple, dict]) -> list[str]:
    """The papers' claims, checked on the measured numbers (lower perplexity wins)."""
    claims = [(("zpruner", "none"), ("wanda", "none"), "Z-Pruner beats Wanda"),
              (("cvr", "ec"), ("wanda", "none"), "CVR+EC beats Wanda"),
              (("wanda", "ec"), ("wanda", "none"), "EC improves Wanda")]
    lines = []
    for better, than, claim in claims:
        for p in PATTERNS:
            a, b = by_cell.get((*better, p)), by_cell.get((*than, p))
            if a and b:
                va, vb = ppl(a), ppl(b)
                lines.append(f"- {claim} at {p}: {'holds' if va < vb else 'does not hold'} ({va:.2f} vs {vb:.2f})")
    best = [min(((m, u) for m in METHODS for u in UPDATES if (m, u, p) in by_cell),
                key=lambda mu: ppl(by_cell[(*mu, p)])) for p in PATTERNS]
    named = ["+".join(x for x in mu if x != "none") for mu in best]
    lines.append("- Lowest perplexity: " + ", ".join(
        f"{name} at {p} ({ppl(by_cell[(*mu, p)]):.2f})" for name, mu, p in zip(named, best, PATTERNS)))
    helped = [f"{m} at {p}" for m in METHODS for p in PATTERNS
              if (m, "ec", p) in by_cell and (m, "none", p) in by_cell
              and ppl(by_cell[(m, "ec", p)]) < ppl(by_cell[(m, "none", p)])]
    lines.append("- EC lowers the perplexity of: " + (", ".join(helped) or "none") + "; it raises every other one")
    return lines


def comparison(before: dict[str, dict], after: dict[str, dict]) -> tuple[list[str], bool]:
    lines = ["| method | update | pattern | before | after | after - before | relative | required | ok |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    ok_all = True
    order = {(m, u, p): i for i, (m, u, p) in enumerate(
        [("dense", "-", "50 %")] + [(m, u, p) for m in METHODS for u in UPDATES for p in PATTERNS])}
    keys = sorted(set(before) | set(after), key=lambda k: order.get(cell_of((before.get(k) or after[k])["config"]), 99))
    for key in keys:
        b, a = before.get(key), after.get(key)
        method, update, pattern = cell_of((b or a)["config"])
        pattern = "-" if method == "dense" else pattern
        if b is None or a is None:
            ok_all = False
            lines.append(f"| {method} | {update} | {pattern} | {'-' if b is None else f'{ppl(b):.2f}'} | "
                         f"{'-' if a is None else f'{ppl(a):.2f}'} | | | | missing |")
            continue
        vb, va = ppl(b), ppl(a)
        tolerance = NOISY.get(method)
        ok = abs(va - vb) <= tolerance * vb if tolerance else f"{va:.2f}" == f"{vb:.2f}"
        ok_all &= ok
        required = f"within {tolerance:.0%}" if tolerance else "2 decimals"
        lines.append(f"| {method} | {update} | {pattern} | {vb:.2f} | {va:.2f} | {va - vb:+.4f} | "
                     f"{(va - vb) / vb:+.4%} | {required} | {'yes' if ok else 'NO'} |")
    return lines, ok_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "out" / "quick_table.jsonl", help="the sweep's results")
    parser.add_argument("--before", type=Path, default=HERE / "quick_table", help="folder of per-cell JSONs")
    args = parser.parse_args()
    after, before = load_jsonl(args.results), load_dir(args.before)
    by_cell = {cell_of(r["config"]): r for r in after.values()}
    lines, ok = comparison(before, after)
    identical = sum(ppl(before[k]) == ppl(after[k]) for k in set(before) & set(after))
    same_data = {(r.get("calibration_sha256_16"), r["perplexity_protocol"].get("data_sha256_16"))
                 for r in [*after.values(), *before.values()] if r["config"].get("prune") is not None
                 and r.get("calibration_sha256_16")}
    summary = (f"{len(before)} cells before, {len(after)} after, {identical} with the identical float; "
               f"(calibration, evaluation) token hashes of the calibrated cells, both runs: {sorted(same_data)}")
    print("\n".join(["## Re-measured", "", *table(by_cell), "", *orderings(by_cell), "",
                     "## Before (experiments/quick_table/*.json) and after (quick_table.jsonl), by run key", "",
                     *lines, "", summary, f"acceptance: {'met' if ok else 'NOT met'}"]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
