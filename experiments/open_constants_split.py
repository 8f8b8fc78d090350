"""Split the local C4 head for experiments/open_constants.toml: documents 0-799 become the
calibration pool, documents 800-999 the held-out evaluation text. A grid file cannot
express this step (it names data, it does not make it), so it stays a script. Run from
the repository root, before the sweep (see experiments/open_constants.md):

    .venv/bin/python experiments/open_constants_split.py --data-dir ../shared/data

It writes runs/open_constants/c4-calibration.jsonl and c4-heldout.jsonl (runs/ is not
committed), the paths the grid file gives as calibration and eval_dataset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zpruner.data import DATASETS, read_jsonl_texts

CALIBRATION_DOCS = 800


def split(data_dir: Path, into: Path) -> tuple[Path, Path]:
    docs = read_jsonl_texts(data_dir / DATASETS["c4"][0])
    into.mkdir(parents=True, exist_ok=True)
    paths = into / "c4-calibration.jsonl", into / "c4-heldout.jsonl"
    for path, part in zip(paths, (docs[:CALIBRATION_DOCS], docs[CALIBRATION_DOCS:])):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/open_constants"))
    args = parser.parse_args()
    for path in split(args.data_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
