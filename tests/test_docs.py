"""The docs cannot go stale against the code: the command reference in docs/usage.md is the
parser's own help, every flag the parser knows is documented, the README stays a front
door, and describing a run imports no torch.

    ZPRUNER_UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_docs.py

rewrites docs/usage.md's generated part; without the variable a test fails when it differs.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zpruner.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
USAGE = REPO / "docs" / "usage.md"
START, END = "<!-- usage:start -->", "<!-- usage:end -->"
COMMANDS = ("prune", "eval", "sweep", "report")


def help_text(command: str, monkeypatch) -> str:
    """``zpruner COMMAND --help`` as the parser prints it, 100 columns wide."""
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return out.getvalue().rstrip()


def flags() -> set[str]:
    """Every option string of every subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s for p in sub.choices.values() for a in p._actions for s in a.option_strings if s.startswith("--")} \
        - {"--help"}


def documents() -> dict[Path, str]:
    """README.md and the docs pages it links, by path."""
    readme = (REPO / "README.md").read_text()
    pages = {REPO / "README.md": readme}
    for link in re.findall(r"\]\((docs/[\w./-]+\.md)\)", readme):
        pages[REPO / link] = (REPO / link).read_text()
    return pages


def test_the_command_reference_is_the_parsers_help(monkeypatch):
    blocks = [f"### `zpruner {c}`\n\n```\n{help_text(c, monkeypatch)}\n```" for c in COMMANDS]
    text = USAGE.read_text()
    assert START in text and END in text, f"docs/usage.md lacks the markers {START} ... {END}"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    generated = f"{head}{START}\n" + "\n\n".join(blocks) + f"\n{END}{tail}"
    if os.environ.get("ZPRUNER_UPDATE_DOCS"):
        USAGE.write_text(generated)
        text = generated
    assert text == generated, ("docs/usage.md's command reference differs from the parser; regenerate it with "
                               "ZPRUNER_UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_docs.py")


def test_every_flag_is_in_the_readme_or_a_page_it_links():
    pages = documents()
    assert REPO / "docs" / "usage.md" in pages, "the README must link docs/usage.md"
    missing = [f for f in sorted(flags()) if not any(re.search(re.escape(f) + r"(?![\w-])", t) for t in pages.values())]
    assert not missing, f"flags documented nowhere: {missing}"


def test_the_readme_is_a_front_door():
    """At most 300 lines, opening with exactly the two commands (the demo, the tests)."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    opening = lines[lines.index("```bash") + 1:lines.index("```")]
    assert [line.split()[:2] for line in opening] == [["make", "demo"], ["make", "test"]]


def user_docs() -> list[Path]:
    """The pages a user reads: the README, docs/, the benchmarks' and experiments' READMEs and
    the experiments' readings (experiments/*.md); not the outputs in */out/, which are records."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
            *sorted((REPO / "experiments").glob("*.md"))]


def test_no_timestamps_or_issue_numbers_in_user_docs():
    assert REPO / "experiments" / "README.md" in user_docs()
    for path in user_docs():
        hits = [line for line in path.read_text().splitlines()
                if re.search(r"\bissue \d+|\b20\d\d-\d\d-\d\d\b|\b\d\d:\d\d UTC\b", line, re.IGNORECASE)]
        assert not hits, f"{path.relative_to(REPO)}: {hits[:3]}"


def test_relative_links_resolve():
    for path in user_docs():
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue
            assert (path.parent / link.split("#")[0]).exists(), f"{path.relative_to(REPO)}: broken link {link}"


@pytest.mark.parametrize("folder", ["benchmarks", "experiments"])
def test_every_measurement_file_is_named_after_its_source_and_cited(folder):
    """benchmarks/ and experiments/ hold scripts, grids, readings and folders their README cites;
    every output is out/<script or grid>.<ext> (or out/<grid>_report/), and the README cites it."""
    root = REPO / folder
    readme = (root / "README.md").read_text()
    sources = {p.stem for p in root.iterdir() if p.suffix in (".py", ".toml")}
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith((".", "__"))):
        if entry.name in ("README.md", "out"):
            continue
        assert entry.suffix in (".py", ".toml", ".md") or entry.is_dir(), f"{folder}/{entry.name}: an output outside out/"
        assert entry.name in readme, f"{folder}/README.md does not cite {entry.name}"
    for output in sorted((root / "out").iterdir()):
        name = output.name.split(".")[0]
        assert name in sources or name.removesuffix("_report") in sources, \
            f"{folder}/out/{output.name} is named after no script or grid of {folder}/"
        assert f"out/{output.name}" in readme, f"{folder}/README.md does not cite out/{output.name}"


def test_describing_a_run_imports_no_torch():
    code = ("import sys, zpruner.config as c; c.RunConfig.from_options(None, method='wanda', sparsity=0.5); "
            "print(','.join(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the method registries load the methods (torch) only when a method's name is looked up
    code = "import sys, zpruner.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
    assert "lm_eval" not in out.stdout
