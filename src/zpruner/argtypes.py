"""Option values read from the command line: each parser turns a word into a value or into
one error line (argparse's ArgumentTypeError), and ``Parser`` prints that line alone."""
from __future__ import annotations

import argparse
import math
import re


class Parser(argparse.ArgumentParser):
    """Bad options give one error line (not a usage dump), exit code 2.

    A word that starts like a negative number (-1, -.5, -1e-3, -inf, -nan, -1,2) is a value,
    never an option: argparse's own test knows only plain decimals, so ``--cvr-eps -inf``
    was "expected one argument" where ``--cvr-eps=-inf`` reached the option's check."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give an integer >= 0")
    return value


def seed(text: str) -> int:
    value = integer(text)
    if value < 0:
        # Python's random takes -n as n: a negative seed would repeat another seed's windows
        raise argparse.ArgumentTypeError(f"{value} is negative; a seed is an integer >= 0")
    return value


def window(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("a window of 1 token predicts nothing; give at least 2")
    return value


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def clamp_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo, hi = (finite(v) for v in parts)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a range LO,HI of finite numbers such as 0.5,2") from None
    return lo, hi


def comma_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {kind.__name__}") from None

    return parse


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not above 0")
    return value


def non_negative_float(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value
