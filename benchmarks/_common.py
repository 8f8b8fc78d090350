"""Pieces shared by the benchmark scripts: method names, environment record, output.

The scripts import this as ``_common`` (Python puts the running script's folder first on
``sys.path``), so they run from any working directory without installing anything extra.
torch and zpruner are imported inside the functions that need them: end_to_end.py's parent
process must stay small, since a child started with fork+exec inherits the parent's peak
RSS in its own ``ru_maxrss``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = str(PROJECT.parent / "shared" / "data")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        d_out, d_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is not OUTxIN, e.g. 5120x5120") from None
    if d_out < 1 or d_in < 1:
        raise argparse.ArgumentTypeError(f"shape '{text}' needs positive sizes")
    return d_out, d_in


def vm_hwm_mib() -> float | None:
    """Peak resident memory of this process's own address space (Linux VmHWM), in MiB;
    None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def prune_config(method: str, **fields):
    """PruneConfig for a benchmark method name: 'wanda', or 'METHOD+UPDATE' such as
    'cvr+ec' (score cvr, energy compensation) or 'wanda+sparsegpt' (Wanda mask, SparseGPT
    reconstruction), the names the papers' tables use; or 'recipe:NAME' (``--recipe NAME``:
    its options for the pattern and sparsity in ``fields``, which win where they overlap)."""
    from zpruner import PruneConfig

    if method.startswith("recipe:"):
        from zpruner.recipes import apply_recipe

        options, _ = apply_recipe(method.partition(":")[2], fields)
        return PruneConfig(**options)
    score, _, update = method.partition("+")
    return PruneConfig(method=score, update=update or "none", **fields)


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, each checked by building its config once, so a typo
    stops the run before any measurement instead of after an hour."""
    from zpruner import ZprunerError

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods:
        try:
            prune_config(method)
        except ZprunerError as exc:
            print(f"--methods: '{method}': {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return methods


def calib_batch_size(config) -> int | None:
    """The engine's calibration batch (samples per block forward), when this version of
    zpruner has the option; None when it predates it (one sample per forward)."""
    return getattr(config, "calib_batch_size", None)


def environment() -> dict:
    """What the timings depend on besides the code: versions, cores and threads."""
    import torch
    import transformers
    import zpruner

    return {
        "zpruner": zpruner.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }


def describe_threads() -> str:
    import torch

    env = os.environ.get("OMP_NUM_THREADS")
    return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={env if env is not None else 'unset'})"


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns whose index is in ``right`` are right-aligned (numbers)."""
    rule = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = [headers, rule, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Written to a temporary name, then renamed: an interrupted run leaves no half file."""
    path = Path(path).expanduser()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run_in_tree(src: str | os.PathLike, code: str, *args: str) -> dict:
    """Runs ``code`` with ``args`` in a fresh Python whose PYTHONPATH is ``src`` (one
    version of zpruner's source tree); returns the JSON object on its last output line."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.splitlines()[-1])


def add_source_trees(parser, marker: str) -> None:
    """--before (required) and --after (default: this checkout's src/): two versions of
    zpruner's source for a same-run comparison; each must hold ``zpruner/<marker>``."""

    def tree(text: str) -> Path:
        path = Path(text)
        if not (path / "zpruner" / marker).is_file():
            raise argparse.ArgumentTypeError(f"{path} is not a src/ folder with zpruner in it")
        return path

    parser.add_argument("--before", type=tree, required=True, help="the src/ folder of the earlier version")
    parser.add_argument("--after", type=tree, default=str(PROJECT / "src"), help="default: this checkout's src/")
