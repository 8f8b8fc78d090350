"""``--recipe``: zpruner's advice as options to type, not a paragraph to read.

A recipe fills, for the run's ``--pattern`` and ``--sparsity``, the pruning options the
measurements support (method, update, allocation, selection and their constants). Like a
``--protocol``, it fills only what the user left unset: an option given explicitly wins,
and the results JSON records both what the recipe chose and what was overridden
(``config.recipe``). The evidence for 'recommended': docs/reconstruction.md. Torch-free
(``zpruner.config`` applies it in ``RunConfig.from_options``).
"""
from __future__ import annotations

from typing import Any

from .errors import ZprunerError
from .patterns import Pattern
from .registry import get_method

RECIPES = ("recommended",)


def recommended(pattern: str, sparsity: float | None, method: str | None = None) -> dict[str, Any]:
    """The advised options for this pattern and sparsity (None: the default 0.5, or N/M):
    the ADMM solver, its mask compared within each output row for unstructured sparsity
    (``--group row``); below 70 % and at N:M, the reconstruction shrunk per matrix toward
    the mask alone as far as text the model generates itself says (``--select heldout``);
    from 70 % unstructured, OWL's per-block sparsity instead, since there the mask alone is
    far worse and shrinking toward it lost on held-out text. Given a score ``method`` (the
    user's), its mask gets the ADMM update instead of the solver's. Evidence:
    experiments/reconstruction.md."""
    nm = Pattern.parse(pattern).is_nm
    entry = get_method(method or "admm")
    score = entry.kind == "score"
    high = not nm and sparsity is not None and sparsity >= 0.7 - 1e-9
    options: dict[str, Any] = {"method": "admm", "update": "admm" if score else "none",
                               "select": "none" if high else "heldout", "allocation": "owl" if high else "uniform"}
    if not nm and not score and entry.default_group is not None:  # a solver that compares within a group
        options["group"] = "row"
    return options


def _streamed(options: dict[str, Any]) -> bool:
    """Blocks streamed from disk or moved to a GPU: the model is never whole on one device,
    so it cannot generate held-out text; calibration windows are held out instead."""
    return options.get("offload") in ("disk", "cpu")


def apply_recipe(name: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(options with the recipe's choices filled in where not given, the record for the
    results). ``options``: flat run options, None meaning "not given"."""
    if name is None:
        return options, None
    if name not in RECIPES:
        raise ZprunerError(f"recipe '{name}' is unknown; choose one of {', '.join(RECIPES)}")
    chosen = recommended(options.get("pattern") or "unstructured", options.get("sparsity"), options.get("method"))
    if _streamed(options) and chosen["select"] == "heldout":
        chosen["heldout_texts"] = 0
    explicit = {k: options[k] for k in chosen if options.get(k) is not None and options[k] != chosen[k]}
    filled = {**options, **{k: v for k, v in chosen.items() if options.get(k) is None}}
    return filled, {"name": name, "chose": chosen, "overridden_by_options": explicit}

