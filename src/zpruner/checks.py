"""Type and range checks of option values, shared by the configurations, the method
registries and the sweep's grid files: one wording for the CLI, the Python API and grids.

Every message names the option as the user wrote it (``name (--flag-name)``).
"""
from __future__ import annotations

import math

from .errors import ZprunerError


def is_number(value) -> bool:
    """int or float, not bool (True is an int to Python, never a number to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def label(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_int(name: str, value, minimum: int | None = 1) -> None:
    """``value`` is an integer (not a bool, not a string) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ZprunerError(f"{label(name)} must be {bound}, got {value!r}")


def check_float(name: str, value, minimum: float | None = None, strict: bool = False) -> None:
    """``value`` is a finite number, >= ``minimum`` (> with ``strict``). NaN and infinity are
    refused everywhere: one of them in a constant silently ruins every score."""
    ok = is_number(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ZprunerError(f"{label(name)} must be a finite number{bound}, got {value!r}")


def check_str(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ZprunerError(f"{label(name)} must be a non-empty text, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ZprunerError(f"{label(name)} must be true or false, got {value!r}")


def check_pair(name: str, value) -> tuple[float, float]:
    """A range LO,HI of two finite numbers, as a tuple of floats."""
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2 or not all(
            is_number(v) and math.isfinite(v) for v in value):
        raise ZprunerError(f"{label(name)} must be two finite numbers LO,HI such as 0.8,1.25, got {value!r}")
    return float(value[0]), float(value[1])


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ZprunerError(f"{label(name)} {value!r} is unknown; choose one of {', '.join(choices)}")


def check_fraction(name: str, value) -> None:
    """A fraction in [0, 1)."""
    if not is_number(value) or not 0 <= value < 1:
        raise ZprunerError(f"{label(name)} must be a fraction in [0, 1), e.g. 0.25, got {value!r}")
