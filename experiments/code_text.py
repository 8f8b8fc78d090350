"""Python source as calibration and held-out text (experiments/reconstruction.md): real code
nobody here wrote, far from WikiText-2 and C4. From this Python's standard library, sorted,
so that the files are the same on every run of this script on this Python:

- calibration: every top-level module, ``lib/python3.11/*.py``, one document per file;
- held-out (for choosing constants, never for the acceptance table): the modules of the
  standard library's packages, ``lib/python3.11/<package>/*.py`` (their tests, ``site-packages``
  and the ``__pycache__``/demo folders left out), every third file, in an order shuffled with
  seed 0 (so that the first evaluation windows are not all one package), one document per file.

Run from the repository root (runs/ is not committed); the grids give these paths:

    .venv/bin/python experiments/code_text.py

Files that are not UTF-8 are skipped and named.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
from pathlib import Path

SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "__phello__", "turtledemo",
                   "lib2to3"}  # lib2to3: mostly fixers of Python 2 code
EVERY = 3


def calibration_files(lib: Path) -> list[Path]:
    return sorted(lib.glob("*.py"))


def heldout_files(lib: Path) -> list[Path]:
    files = sorted(p for p in lib.glob("*/**/*.py")
                   if not SKIPPED_FOLDERS & set(p.relative_to(lib).parts[:-1]))
    files = files[::EVERY]
    random.Random(0).shuffle(files)
    return files


def write(files: list[Path], path: Path, lib: Path) -> int:
    lines = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            print(f"skipped (not UTF-8): {f}", file=sys.stderr)
            continue
        if text.strip():
            lines.append(json.dumps({"text": text}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library folder (default: this Python's)")
    parser.add_argument("--out", type=Path, default=Path("runs/code"))
    args = parser.parse_args()
    for name, files in (("stdlib-calibration.jsonl", calibration_files(args.lib)),
                        ("stdlib-heldout.jsonl", heldout_files(args.lib))):
        n = write(files, args.out / name, args.lib)
        print(f"{args.out / name}: {n} files")


if __name__ == "__main__":
    main()
