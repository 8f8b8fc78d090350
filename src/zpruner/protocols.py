"""Named measurement protocols: calibration size and perplexity windows in one word.

``quick`` is sized for CPUs (64 x 512 calibration tokens, the first 64 WikiText-2 windows
of 512 tokens); ``paper`` is the setting of the SparseGPT / Wanda / Z-Pruner / CVR papers
(128 x 2048 calibration tokens, every WikiText-2 window of 2048 tokens). A preset only
fills the options the user left unset: explicit options always win.
"""
from __future__ import annotations

from typing import Any

from .errors import ZprunerError

# Option name -> value. eval_windows None means every window.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "quick": {"nsamples": 64, "seqlen": 512, "eval_seqlen": 512, "eval_windows": 64},
    "paper": {"nsamples": 128, "seqlen": 2048, "eval_seqlen": 2048, "eval_windows": None},
}
# Without a protocol: the papers' calibration; evaluation at the model's context capped at
# 2048 (zpruner.runner.eval_seqlen), every window.
DEFAULTS: dict[str, Any] = {"nsamples": 128, "seqlen": 2048, "eval_seqlen": None, "eval_windows": None}


def check_protocol(name: str | None) -> None:
    if name is not None and name not in PROTOCOLS:
        raise ZprunerError(f"protocol '{name}' is unknown; choose one of {', '.join(PROTOCOLS)}")


def expand(name: str | None, explicit: dict[str, Any]) -> dict[str, Any]:
    """The protocol's options, overridden by every ``explicit`` value that is not None;
    options neither sets take zpruner's defaults."""
    check_protocol(name)
    chosen = {**DEFAULTS, **(PROTOCOLS[name] if name else {})}
    chosen.update({k: v for k, v in explicit.items() if v is not None})
    return chosen


def describe(name: str) -> str:
    """One line for --help and reports."""
    p = PROTOCOLS[name]
    windows = "every window" if p["eval_windows"] is None else f"the first {p['eval_windows']} windows"
    return (f"{name}: calibration {p['nsamples']} x {p['seqlen']} tokens, WikiText-2 perplexity over "
            f"{windows} of {p['eval_seqlen']} tokens")
