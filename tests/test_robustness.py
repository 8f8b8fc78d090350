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
