"""``zpruner report``: the papers' tables (Markdown) and plots (PNG) from results files.

Input: results as ``zpruner.runner.run`` returns them, one per line of a ``.jsonl``
(``zpruner sweep``) or one per ``.json`` (``zpruner prune --output-json``).

Numbers measured under different protocols never share a table: pruned results are
grouped by model, calibration (source, samples, length) and perplexity evaluation
(dataset, windows, length, data digest), and each group gets its own tables. Dense
perplexity does not depend on calibration, so a dense measurement joins every group with
its model and evaluation. Zero-shot tables are further split by task list and item limit.
The calibration-size table compares sample counts on purpose, so it groups by everything
else.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ZprunerError
from ..io import check_output_folder, write_atomic
from ..results import HINT, Loaded, RunResult, load_results
from .grouping import calibration_groups, method_label, protocol_groups
from .plots import figures
from .tables import build_report, build_tables

__all__ = ["build_report", "build_tables", "method_label", "write_report"]


def write_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write ``out_dir/report.md`` and its PNG plots from the results files ``paths``;
    returns the written files, report.md first.

    Every file goes to a temporary name first and is renamed when complete; report.md is
    renamed last, so it never links a plot that is not there."""
    loaded = load_results(paths)
    results = loaded.distinct()
    out = check_output_folder("--out", out_dir)
    try:
        return _write_report(results, loaded, out, title)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # results._check_result covers what the tables read; this names any remaining oddity in one line
        raise ZprunerError(f"a result in {', '.join(name for name, _ in loaded.inputs)} is not shaped as zpruner writes it "
                           f"({type(exc).__name__}: {exc}); {HINT}") from exc


def _write_report(results: list[RunResult], loaded: Loaded, out: Path, title: str | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures(protocol_groups(results), calibration_groups(results))
    written = []
    for name, figure in drawn.values():
        write_atomic(out / name, lambda f, fig=figure: fig.savefig(f, format="png", dpi=120))
        written.append(out / name)
    markdown = build_report(results, loaded.inputs, {key: name for key, (name, _) in drawn.items()}, title)
    write_atomic(out / "report.md", lambda f: f.write(markdown.encode()))
    return [out / "report.md", *written]
