"""WikiText-2 perplexity of every method, with and without energy compensation, at 50 %
unstructured, 4:8 and 2:4 on SmolLM2-135M, quick protocol (calibration 64 x 512 tokens
of C4, seed 0; WikiText-2 test, first 64 windows of 512 tokens).

Each cell is one `zpruner` command (printed before it runs) writing one results JSON;
cells whose JSON exists are not run again, so an interrupted run resumes. Usage:

    .venv/bin/python experiments/quick_table.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["magnitude", "wanda", "sparsegpt", "ria", "zpruner", "cvr"]
UPDATES = ["none", "ec"]
PATTERNS = {"50%": ["--sparsity", "0.5"], "4:8": ["--pattern", "4:8"], "2:4": ["--pattern", "2:4"]}
QUICK = ["--eval-seqlen", "512", "--eval-windows", "64"]
CALIBRATION = ["--nsamples", "64", "--seqlen", "512", "--seed", "0"]


HEADER = """# WikiText-2 perplexity of every method on SmolLM2-135M-Instruct, quick protocol

Calibration: 64 windows x 512 tokens of C4 (seed 0). Evaluation: WikiText-2 test, first
64 windows of 512 tokens. Written by `.venv/bin/python experiments/quick_table.py --data-dir
../shared/data`. One cell is one command:
`zpruner prune --method M --update U [--sparsity 0.5 | --pattern 4:8 | --pattern 2:4]
--nsamples 64 --seqlen 512 --seed 0 --model smollm2-135m --eval-seqlen 512 --eval-windows 64
--data-dir ../shared/data --output-json experiments/quick_table/<cell>.json`; dense is
`zpruner eval` with the same evaluation options. Each cell's JSON is in `quick_table/`.
"""


def zpruner_command(argv: list[str]) -> list[str]:
    return [str(Path(sys.executable).with_name("zpruner")), *argv]


def cells(data_dir: str) -> list[tuple[str, list[str]]]:
    common = ["--model", "smollm2-135m", *QUICK, "--data-dir", data_dir, "--quiet"]
    runs = [("dense", ["eval", *common])]
    for method in METHODS:
        for update in UPDATES:
            for label, pattern in PATTERNS.items():
                name = f"{method}-{update}-{label.replace('%', '').replace(':', 'of')}"
                runs.append((name, ["prune", "--method", method, "--update", update, *pattern, *CALIBRATION, *common]))
    return runs


def run_missing(data_dir: str, out: Path, only: list[str] | None) -> None:
    """Run the cells without a JSON yet: all, or those matching ``only``'s prefixes, in that order."""
    todo = cells(data_dir)
    if only:
        todo = [cell for prefix in only for cell in todo if cell[0].startswith(prefix)]
    for name, argv in todo:
        target = out / f"{name}.json"
        if target.exists():
            continue
        command = zpruner_command([*argv, "--output-json", str(target)])
        print("$ zpruner " + shlex.join(command[1:]), flush=True)
        subprocess.run(command, check=True)


def table(out: Path) -> str:
    def ppl(name: str) -> float | None:
        path = out / f"{name}.json"
        return json.loads(path.read_text())["perplexity_protocol"]["value"] if path.exists() else None

    lines = ["| method | update | 50 % | 4:8 | 2:4 |", "|---|---|---:|---:|---:|"]  # "-": not run yet
    dense = ppl("dense")
    lines.append(f"| dense | - | {dense:.2f} | | |" if dense else "| dense | - | not run | | |")
    for method in METHODS:
        for update in UPDATES:
            values = [ppl(f"{method}-{update}-{p}") for p in ("50", "4of8", "2of4")]
            lines.append(f"| {method} | {update} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def orderings(out: Path) -> list[str]:
    """The papers' claims, checked on the measured numbers."""
    claims = [("zpruner-none", "wanda-none", "Z-Pruner beats Wanda"),
              ("cvr-ec", "wanda-none", "CVR+EC beats Wanda"),
              ("wanda-ec", "wanda-none", "EC improves Wanda")]
    lines = []
    for better, than, claim in claims:
        for p, label in (("50", "50 %"), ("4of8", "4:8"), ("2of4", "2:4")):
            a, b = (out / f"{better}-{p}.json", out / f"{than}-{p}.json")
            if a.exists() and b.exists():
                va, vb = (json.loads(x.read_text())["perplexity_protocol"]["value"] for x in (a, b))
                lines.append(f"- {claim} at {label}: {'holds' if va < vb else 'does not hold'} ({va:.2f} vs {vb:.2f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=HERE / "quick_table")
    parser.add_argument("--only", help="comma-separated cell-name prefixes to run now, e.g. dense,wanda-none")
    parser.add_argument("--table-only", action="store_true", help="print the table from the JSON files present")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        run_missing(args.data_dir, args.out, args.only.split(",") if args.only else None)
    report = "\n".join([HEADER, table(args.out), "", *orderings(args.out), ""])
    (HERE / "quick_table.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
