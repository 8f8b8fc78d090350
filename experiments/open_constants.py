"""Choose the constants the papers leave open (CVR's alpha and eps, EC's clamp range) on
held-out C4, never on WikiText-2 test.

The local C4 head (1000 documents) is split: documents 0-799 are the calibration pool,
documents 800-999 the held-out evaluation text (joined like WikiText-2, first 32 windows
of 512 tokens). Each configuration prunes SmolLM2-135M to 50 % unstructured with a small
calibration set (16 x 256 tokens, seed 0) and records held-out perplexity. Usage (prints
one table row and appends one JSON line per run; finished runs are skipped):

    .venv/bin/python experiments/open_constants.py --data-dir ../shared/data \
        --out experiments/open_constants.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from zpruner import EvalConfig, ModelConfig, PruneConfig, RunConfig, run
from zpruner.data import DATASETS, read_jsonl_texts

CALIBRATION_DOCS = 800
NSAMPLES, SEQLEN = 16, 256  # calibration: small, so a grid fits on 2 CPU cores
EVAL_SEQLEN, EVAL_WINDOWS = 512, 32


def clamp(hi: float) -> tuple[float, float]:
    return (1 / hi, hi) if math.isfinite(hi) else (0.0, hi)


def grid() -> list[tuple[str, dict]]:
    runs = [("wanda", dict(method="wanda"))]
    runs += [(f"cvr alpha={a:g} eps=1e-06", dict(method="cvr", cvr_alpha=a, cvr_eps=1e-6)) for a in (0, 0.25, 0.5, 1, 2)]
    runs += [(f"wanda+ec clamp={clamp(hi)[0]:.3g},{hi:g}", dict(method="wanda", update="ec", ec_clamp=clamp(hi)))
             for hi in (1.1, 1.25, 1.5, 2.0, math.inf)]
    return runs


def split(data_dir: Path, into: Path) -> tuple[Path, Path]:
    docs = read_jsonl_texts(data_dir / DATASETS["c4"][0])
    paths = into / "c4-calibration.jsonl", into / "c4-heldout.jsonl"
    for path, part in zip(paths, (docs[:CALIBRATION_DOCS], docs[CALIBRATION_DOCS:])):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per finished run (appended)")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs in --out")
    args = parser.parse_args()
    if args.table_only:
        print("| configuration | held-out C4 perplexity |\n|---|---:|")
        for line in args.out.open():
            run_ = json.loads(line)
            print(f"| {run_['label']} | {run_['perplexity_protocol']['value']:.3f} |")
        return
    with tempfile.TemporaryDirectory() as tmp:
        calibration, heldout = split(args.data_dir, Path(tmp))
        done = {json.loads(line)["label"] for line in args.out.open()} if args.out.exists() else set()
        for label, options in grid():
            if label in done:
                continue
            prune = PruneConfig(sparsity=None, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0,
                                calibration=str(calibration), **options)
            config = RunConfig(ModelConfig(args.model), prune,
                               EvalConfig(str(heldout), seqlen=EVAL_SEQLEN, windows=EVAL_WINDOWS))
            result = run(config, progress=False)
            ppl = result["perplexity_protocol"]["value"]
            with args.out.open("a") as f:
                f.write(json.dumps({"label": label, **result}) + "\n")
            print(f"| {label} | {ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
