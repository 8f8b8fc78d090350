"""Issue 32's cases that need more than a command line: negative seeds through the Python
API and grids, a full disk (ENOSPC simulated), SIGTERM during a save, disk space checked up
front, and the non-result lines of a results file."""
from __future__ import annotations

import pytest

from zpruner import PruneConfig
from zpruner.errors import ZprunerError
from zpruner.sweep import Grid


def test_negative_seeds_are_refused_everywhere():
    """random.Random(-1) draws what random.Random(1) draws: a negative seed is another's alias."""
    with pytest.raises(ZprunerError, match=r"seed \(--seed\) must be an integer >= 0, got -1"):
        PruneConfig(seed=-1)
    with pytest.raises(ZprunerError, match=r"seed \(--seed\) must be an integer >= 0, got -1"):
        Grid(seeds=[0, -1])
    assert PruneConfig(seed=0).seed == 0


def test_a_line_that_is_no_json_object_is_skipped_by_report_and_sweep_alike(tmp_path, caplog, monkeypatch):
    """`[]` (or 3, or "x") cannot be a result, like a line cut short by a kill: the report and
    the sweep both skip it with a notice and read the rest; before, the report refused the
    whole file where the sweep skipped the line."""
    import logging
    from pathlib import Path

    from zpruner.results import config_key, load_results
    from zpruner.sweep import read_done

    monkeypatch.setattr(logging.getLogger("zpruner"), "propagate", True)  # the CLI turns it off
    fixture = Path(__file__).parent / "data" / "report_results.jsonl"
    first = fixture.read_text().splitlines()[0]
    path = tmp_path / "results.jsonl"
    path.write_text(f"{first}\n[]\n3\n")
    with caplog.at_level("WARNING", logger="zpruner"):
        results = load_results([path]).results
        done = read_done(path)
    assert len(results) == 1 and done == {config_key(results[0])}
    assert caplog.text.count("line 2 is not a JSON object; skipped") == 2  # the report's notice, then the sweep's
    assert caplog.text.count("line 3 is not a JSON object; skipped") == 2
