"""The acceptance table of ``--recipe recommended`` from the sweep's lines (experiments/out/reconstruction.jsonl):
WikiText-2 perplexity per calibration (C4, code) and setting (50 %, 70 %, 2:4) of Wanda,
SparseGPT, ADMM and `--recipe recommended` (the lines whose options are the recipe's for
that setting), and the recipe against the best of the three (target: <= 0.97x).

    .venv/bin/python experiments/reconstruction_table.py experiments/out/reconstruction.jsonl
"""
from __future__ import annotations

import json
import sys

from zpruner.config import PruneConfig
from zpruner.recipes import apply_recipe

SETTINGS = [("50 %", "unstructured", 0.5), ("70 %", "unstructured", 0.7), ("2:4", "2:4", 0.5)]
CALIBRATIONS = [("C4", "c4"), ("code", "runs/code/stdlib-calibration.jsonl")]
BASELINES = ["wanda", "sparsegpt", "admm"]
TARGET = 0.97


def recipe_identity(pattern: str, sparsity: float, calibration: str) -> dict:
    options, _ = apply_recipe("recommended", {"pattern": pattern, "sparsity": None if ":" in pattern else sparsity})
    return PruneConfig(**options, calibration=calibration, nsamples=64, seqlen=512).identity()


def main(path: str) -> None:
    lines = [json.loads(line) for line in open(path) if line.strip()]
    cells: dict[tuple, dict] = {}
    for r in lines:
        p = r["config"].get("prune")
        if not p:
            continue
        config = PruneConfig.from_dict(p)
        setting = next((label for label, pattern, s in SETTINGS
                        if config.pattern == pattern and abs(config.sparsity - s) < 1e-9), None)
        calibration = next((label for label, source in CALIBRATIONS if config.calibration == source), None)
        if setting is None or calibration is None:
            continue
        pattern, sparsity = next((pt, s) for label, pt, s in SETTINGS if label == setting)
        if config.identity() == recipe_identity(pattern, sparsity, config.calibration):
            name = "recipe"
        elif config.select == "none" and config.update == "none" and config.allocation == "uniform" \
                and config.group is None and config.method in BASELINES:
            name = config.method
        else:
            continue
        cells.setdefault((calibration, setting), {})[name] = (r["perplexity"]["wikitext2"], r.get("adopted_from"),
                                                              r.get("timings_s", {}).get("pruning"))
    header = "| calibration | setting | Wanda | SparseGPT | ADMM | recipe | recipe / best of the three | target <= 0.97x |"
    print(header + "\n|---|---|---:|---:|---:|---:|---:|---|")
    for calibration, _ in CALIBRATIONS:
        for setting, _, _ in SETTINGS:
            cell = cells.get((calibration, setting), {})

            def fmt(name: str) -> str:
                if name not in cell:
                    return "not run"
                value, adopted, _ = cell[name]
                return f"{value:.3f}" + (" \\*" if adopted else "")

            known = [cell[n][0] for n in BASELINES if n in cell]
            ratio = cell["recipe"][0] / min(known) if "recipe" in cell and known else None
            met = "" if ratio is None else ("yes" if ratio <= TARGET else f"**no** (by {100 * (ratio - TARGET):.1f} points)")
            print(f"| {calibration} | {setting} | {fmt('wanda')} | {fmt('sparsegpt')} | {fmt('admm')} | "
                  f"{fmt('recipe')} | {'' if ratio is None else f'{ratio:.3f}x'} | {met} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/out/reconstruction.jsonl")
