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

import hashlib
import os
import re
from pathlib import Path

from ..errors import ZprunerError
from ..io import check_output_folder, refuse_special, write_atomic
from ..results import HINT, Loaded, RunResult, load_results
from .grouping import calibration_groups, method_label, protocol_groups
from .plots import figures
from .tables import build_report, build_tables

__all__ = ["build_report", "build_tables", "method_label", "write_report"]


# The last line of every report.md zpruner writes, with the hash of the text above it: a
# report zpruner wrote and nobody edited since is replaced by the next 'zpruner report'
# (regenerating it as a sweep grows is the command's everyday use, and it loses nothing: the
# results files give it back); any other file at an output path needs --overwrite.
MARKER = "<!-- written by zpruner report (sha256 {}); the next zpruner report replaces it unless it is edited -->\n"
MARKER_RE = re.compile(re.escape(MARKER).replace(re.escape("{}"), "([0-9a-f]{16})") + r"\Z")
PNG_SOFTWARE = "zpruner report"  # the plots' PNG "Software" text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def signed(markdown: str) -> str:
    """``markdown`` with the marker line that tells a later run it may replace the file."""
    markdown = markdown if markdown.endswith("\n") else markdown + "\n"
    return markdown + MARKER.format(_digest(markdown))


def _own_markdown(path: Path) -> bool:
    """A report.md that zpruner wrote and that is unchanged since."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.splitlines(keepends=True)
    found = MARKER_RE.match(lines[-1]) if lines else None
    return found is not None and found.group(1) == _digest("".join(lines[:-1]))


def _png_software(path: Path) -> str | None:
    """The PNG's tEXt "Software" value, or None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"tEXt":
            key, _, value = data[at + 8:at + 8 + length].partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
        at += 12 + length
    return None


def check_report_outputs(out: Path, names: list[str], overwrite: bool) -> None:
    """Every file the report will write in ``out``: never a link, device or folder; an existing
    file only when zpruner wrote it (and, for report.md, nobody edited it) or with ``overwrite``."""
    for name in names:
        path = out / name
        refuse_special("--out", path)
        if path.is_dir():
            raise ZprunerError(f"--out {out}: {name} is a folder; give another --out")
        own = _own_markdown(path) if name.endswith(".md") else _png_software(path) == PNG_SOFTWARE
        if path.exists() and not own and not overwrite:
            raise ZprunerError(f"--out {out}: {name} exists and zpruner report did not write it (or it was edited "
                               "since); add --overwrite to replace it, or give another --out")


def write_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike, title: str | None = None,
                 overwrite: bool = False) -> list[Path]:
    """Write ``out_dir/report.md`` and its PNG plots from the results files ``paths``;
    returns the written files, report.md first. A file at one of those paths that zpruner
    did not write is replaced only with ``overwrite`` (``check_report_outputs``).

    Every file goes to a temporary name first and is renamed when complete; report.md is
    renamed last, so it never links a plot that is not there."""
    loaded = load_results(paths)
    results = loaded.distinct()
    out = check_output_folder("--out", out_dir)
    try:
        return _write_report(results, loaded, out, title, overwrite)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # results._check_result covers what the tables read; this names any remaining oddity in one line
        raise ZprunerError(f"a result in {', '.join(name for name, _ in loaded.inputs)} is not shaped as zpruner writes it "
                           f"({type(exc).__name__}: {exc}); {HINT}") from exc


def _write_report(results: list[RunResult], loaded: Loaded, out: Path, title: str | None,
                  overwrite: bool) -> list[Path]:
    drawn = figures(protocol_groups(results), calibration_groups(results))
    markdown = build_report(results, loaded.inputs, {key: name for key, (name, _) in drawn.items()}, title)
    check_report_outputs(out, ["report.md", *(name for name, _ in drawn.values())], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in drawn.values():
        write_atomic(out / name, lambda f, fig=figure: fig.savefig(f, format="png", dpi=120,
                                                                   metadata={"Software": PNG_SOFTWARE}))
        written.append(out / name)
    text = signed(markdown)
    write_atomic(out / "report.md", lambda f: f.write(text.encode()))
    return [out / "report.md", *written]
