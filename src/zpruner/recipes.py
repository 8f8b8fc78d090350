"""``--recipe``: zpruner's advice as options to type, not a paragraph to read.

A recipe fills, for the run's ``--pattern`` and ``--sparsity``, the pruning options the
measurements support (method, update, allocation, selection and their constants). Like a
``--protocol``, it fills only what the user left unset: an option given explicitly wins,
and the results JSON records both what the recipe chose and what was overridden
(``config.recipe``). The evidence for 'recommended' is experiments/reconstruction.md.
"""
from __future__ import annotations

from typing import Any

from .errors import ZprunerError
from .masks import Pattern
from .registry import get_method

RECIPES = ("recommended",)


def recommended(pattern: str, sparsity: float | None, method: str | None = None) -> dict[str, Any]:
    """The advised options for this pattern and sparsity (None: the default 0.5, or N/M):
    the ADMM solver, its ridge chosen per matrix on held-out calibration windows
    (``--select heldout``); from 70 % unstructured, OWL's per-block sparsity too. Given a
    score ``method`` (the user's), its mask gets the ADMM update instead of the solver's."""
    nm = Pattern.parse(pattern).is_nm
    score = method is not None and get_method(method).kind == "score"
    options: dict[str, Any] = {"method": "admm", "update": "admm" if score else "none", "select": "heldout"}
    if not nm and sparsity is not None and sparsity >= 0.7 - 1e-9:
        options["allocation"] = "owl"
    else:
        options["allocation"] = "uniform"
    return options


def apply_recipe(name: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(options with the recipe's choices filled in where not given, the record for the
    results). ``options``: flat run options, None meaning "not given"."""
    if name is None:
        return options, None
    if name not in RECIPES:
        raise ZprunerError(f"recipe '{name}' is unknown; choose one of {', '.join(RECIPES)}")
    chosen = recommended(options.get("pattern") or "unstructured", options.get("sparsity"), options.get("method"))
    explicit = {k: options[k] for k in chosen if options.get(k) is not None and options[k] != chosen[k]}
    filled = {**options, **{k: v for k, v in chosen.items() if options.get(k) is None}}
    return filled, {"name": name, "chose": chosen, "overridden_by_options": explicit}
