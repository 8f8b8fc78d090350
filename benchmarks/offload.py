"""Time and peak memory of pruning under --offload none and disk, one `zpruner` process per
measurement (its own results JSON records its wall phases and its peak RSS, VmHWM).

Two sets:
- ``smollm2``: SmolLM2-135M, Wanda 50 %, quick protocol, under none and disk (disk's cost
  over none is the price of streaming when the model would fit).
- ``7b``: a synthetic LLaMA-2-7B (benchmarks/synthetic_model.py; 13.8 GB of bfloat16 on
  disk, 27.5 GB in float32, more than this machine's memory) under disk: one streamed
  forward over the calibration's token count (``zpruner eval`` of that many tokens), then
  Wanda and SparseGPT at 50 % with that calibration, without evaluation.

Usage (each set appends to --out, one JSON line per measurement, so an interrupted run
keeps what it measured; --table prints the Markdown table of --out):

    .venv/bin/python benchmarks/offload.py smollm2 --out benchmarks/out/offload.jsonl
    .venv/bin/python benchmarks/synthetic_model.py llama-2-7b --out /work/synthetic/llama-2-7b
    .venv/bin/python benchmarks/offload.py 7b --model /work/synthetic/llama-2-7b --out benchmarks/out/offload.jsonl
    .venv/bin/python benchmarks/offload.py --table --out benchmarks/out/offload.jsonl
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_DATA_DIR, markdown_table

GIB = 1 << 30


def zpruner(argv: list[str], label: str, out: Path, extra: dict) -> dict:
    """Run one zpruner command; its results JSON plus the wall time seen from outside."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "r.json"
        command = [str(Path(sys.executable).with_name("zpruner")), *argv, "--quiet", "--output-json", str(result_file)]
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        result = json.loads(result_file.read_text())
    entry = {"label": label, "command": " ".join(["zpruner", *argv]), "wall_s": wall,
             "peak_rss_bytes": result["peak_rss_bytes"], "offload": result["offload"],
             "timings_s": result["timings_s"], "perplexity": result.get("perplexity"), **extra}
    with out.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"{label}: {wall:.0f} s, peak RSS {entry['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
    return entry


def smollm2(args) -> None:
    for mode in args.modes.split(","):
        zpruner(["prune", "--model", "smollm2-135m", "--method", "wanda", "--protocol", "quick",
                 "--data-dir", args.data_dir, "--offload", mode], f"smollm2 wanda 50% {mode}", args.out,
                {"set": "smollm2"})


def seven_b(args) -> None:
    calibration = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    if not args.no_forward:
        zpruner(["eval", "--model", args.model, "--data-dir", args.data_dir, "--offload", "disk", "--eval-seqlen",
                 str(args.seqlen), "--eval-windows", str(args.nsamples)], "7b streamed forward", args.out,
                {"set": "7b", "tokens": args.nsamples * args.seqlen})
    for method in args.methods.split(","):
        zpruner(["prune", "--model", args.model, "--data-dir", args.data_dir, "--offload", "disk", "--method",
                 method, *calibration, "--no-eval"], f"7b {method} 50%", args.out,
                {"set": "7b", "tokens": args.nsamples * args.seqlen})


def table(out: Path) -> str:
    entries = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = []
    for set_name in ("smollm2", "7b"):
        group = [e for e in entries if e["set"] == set_name]
        base = next((e for e in group if e["label"].endswith(" none") or "forward" in e["label"]), None)
        for e in group:
            ratio = f"{e['wall_s'] / base['wall_s']:.2f}" if base else ""
            rows.append([e["label"], e["offload"], f"{e['wall_s']:.0f}", ratio,
                         f"{e['peak_rss_bytes'] / GIB:.2f}", f"`{e['command']}`"])
    return markdown_table(["measurement", "offload", "wall s", "x first row of its set", "peak RSS GiB", "command"],
                          rows, right={2, 3, 4})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", nargs="?", choices=["smollm2", "7b"])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument("--model", help="the synthetic 7B folder (set 7b)")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--modes", default="none,disk", help="set smollm2: the --offload modes to run")
    parser.add_argument("--no-forward", action="store_true",
                        help="set 7b: skip the streamed forward (already in --out from the same session)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.set == "7b" and not args.model:
        parser.error("set 7b needs --model (the folder written by synthetic_model.py)")
    {"smollm2": smollm2, "7b": seven_b}[args.set](args)


if __name__ == "__main__":
    main()
