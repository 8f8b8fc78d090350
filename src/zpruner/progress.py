"""Progress bars that suit both a person at a terminal and a log file.

At a terminal tqdm redraws its line in place; written to a file or a pipe (a batch job's
log), every redraw would be a new line, so there a bar prints at most one line every
``LOG_INTERVAL_S`` seconds.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), throttled when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
