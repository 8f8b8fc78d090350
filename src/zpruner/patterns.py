"""Sparsity patterns (unstructured, N:M) and the sparsity a run asks for: what a mask must
satisfy, described without torch (a configuration names them; ``masks`` makes them)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import is_number
from .errors import ZprunerError


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern. ``n``/``m`` set for N:M (n zeros in every m consecutive inputs)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = text.strip().lower()
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ZprunerError(
                f"pattern '{text}' is not understood; use 'unstructured' or N:M such as 2:4 or 4:8"
            )
        n, m = int(parts[0]), int(parts[1])
        if m < 1 or not 0 < n < m:
            raise ZprunerError(
                f"pattern {n}:{m} is invalid: N (zeros per group) must satisfy 0 < N < M; e.g. 2:4"
            )
        return cls(n, m)


def check_sparsity(sparsity: float) -> None:
    if not is_number(sparsity) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ZprunerError(f"sparsity {sparsity!r} is out of range; give a fraction in [0, 1), e.g. 0.5")
