"""Choosing the constants of ``--select heldout`` on held-out text, never on WikiText-2 test.

Each configuration prunes SmolLM2-135M once and is measured on two held-out texts, so that
both directions of a distribution shift are seen in one pruning:
- held-out C4: documents 800-999 of the local C4 head (experiments/open_constants_split.py);
- held-out code: standard-library package modules that are not calibration files
  (experiments/code_text.py).
Calibration is C4 documents 0-799 or the standard library's top-level modules. Each run's
line (configuration, both perplexities, what the selection chose, pruning seconds) is
appended to --out. From the repository root:

    .venv/bin/python experiments/open_constants_split.py --data-dir ../shared/data
    .venv/bin/python experiments/code_text.py
    OMP_NUM_THREADS=1 .venv/bin/python experiments/reconstruction_constants.py --data-dir ../shared/data \\
        --out experiments/out/reconstruction_constants.jsonl --calibration code --configs '[{"method": "wanda"}]'

--configs is a JSON list of PruneConfig options; a configuration already in --out (same
options, calibration and protocol) is skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from zpruner import PruneConfig, calibration_windows, eval_tokens, load_model, load_texts, perplexity, prune
from zpruner.config import ModelConfig

CALIBRATIONS = {"c4": "runs/open_constants/c4-calibration.jsonl", "code": "runs/code/stdlib-calibration.jsonl"}
HELDOUT = {"c4": "runs/open_constants/c4-heldout.jsonl", "code": "runs/code/stdlib-heldout.jsonl"}


def summary(selection: dict) -> dict:
    """How often each ridge factor (None: the mask alone) was chosen, and the mean α."""
    if not selection:
        return {}
    factors = Counter(str(r["factor"]) for r in selection.values())
    alphas = [r["alpha"] for r in selection.values() if r["factor"] is not None]
    return {"factors": dict(factors), "mean_alpha": sum(alphas) / len(alphas) if alphas else None}


def table(path: Path) -> str:
    """The lines of ``path`` as a Markdown table: calibration, options, both held-out
    perplexities, the mean shrinkage α and the families chosen."""
    rows = ["| calibration | configuration | held-out C4 | held-out code | mean α | chosen per matrix |",
            "|---|---|---:|---:|---:|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        k, ppl, sel = r["key"], r["heldout_perplexity"], r.get("selection") or {}
        options = ", ".join(f"{n}={v}" for n, v in k["options"].items())
        extra = f" (appended {Path(k['append']).name})" if k.get("append") else ""
        alpha = sel.get("mean_alpha")
        families = Counter(v.get("family", "configured") for v in (r.get("selection_per_matrix") or {}).values())
        rows.append(f"| {k['calibration']} {k['nsamples']}x{k['seqlen']} | {options}{extra} | {ppl['c4']:.2f} | "
                    f"{ppl['code']:.2f} | {'' if alpha is None else f'{alpha:.2f}'} | "
                    f"{', '.join(f'{n} {c}' for n, c in families.items())} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="print --out as a Markdown table, run nothing")
    parser.add_argument("--calibration", choices=list(CALIBRATIONS))
    parser.add_argument("--configs", help="JSON list of PruneConfig options")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--append", type=Path, help="token ids [n, seqlen] (torch.save) appended to the calibration "
                                                    "windows, as the last batches (e.g. held-out generated text)")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.calibration is None or args.configs is None:
        parser.error("--calibration and --configs are required to run")
    done = set()
    if args.out.exists():
        done = {json.dumps(json.loads(line)["key"], sort_keys=True) for line in args.out.read_text().splitlines()
                if line.strip()}
    model, tokenizer = load_model(ModelConfig("smollm2-135m"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    texts = load_texts(CALIBRATIONS[args.calibration])
    calibration = calibration_windows(tokenizer, texts, args.nsamples, args.seqlen, 0)
    if args.append is not None:
        calibration = torch.cat([calibration, torch.load(args.append)])
    evals = {name: eval_tokens(tokenizer, load_texts(path)) for name, path in HELDOUT.items()}
    for options in json.loads(args.configs):
        key = {"options": options, "calibration": args.calibration, "nsamples": args.nsamples,
               "append": None if args.append is None else str(args.append),
               "seqlen": args.seqlen, "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen}
        if json.dumps(key, sort_keys=True) in done:
            print("done already:", options, flush=True)
            continue
        model.load_state_dict(dense)
        config = PruneConfig(**options, nsamples=args.nsamples, seqlen=args.seqlen,
                             calibration=CALIBRATIONS[args.calibration])
        start = time.perf_counter()
        report = prune(model, config, calibration, progress=False)
        seconds = time.perf_counter() - start
        ppl = {name: perplexity(model, tokens, args.eval_seqlen, args.eval_windows, 1, False).value
               for name, tokens in evals.items()}
        line = {"key": key, "constants": config.used_constants(), "heldout_perplexity": ppl, "pruning_s": seconds,
                "selection": summary(report.selection),
                "selection_per_matrix": report.selection}
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(args.calibration, options, {k: round(v, 3) for k, v in ppl.items()}, f"{seconds:.0f} s",
              line["selection"], flush=True)


if __name__ == "__main__":
    main()
