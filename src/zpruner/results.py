"""What a run writes into its results: only numbers JSON can hold."""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def replace_non_finite(results: dict) -> list[str]:
    """Replace every NaN or infinity in ``results`` by None (JSON has no such numbers) and
    list where they were under ``results["non_finite"]``; a diverged pruned model has an
    infinite perplexity, which must read as "not measurable", never as a number."""
    found: list[str] = []

    def walk(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where} = {value}")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    results.update(walk(results, ""))
    if found:
        results["non_finite"] = found
        log.warning("not finite, written as null: %s (the pruned model diverged)", "; ".join(found))
    return found
