"""Argument types for the command line: numbers are checked when parsed, so a bad one is refused at once with
argparse's one line (`error: argument --seq-len: must be at least 2, got 0`)."""

from __future__ import annotations

import argparse


MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


def count(least: int = 1, most: int | None = None):
    """An argparse type: a whole number of at least `least` (and at most `most`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
        return value

    parse.__name__ = f"whole number >= {least}"
    parse.least = least  # for tests that try every count option
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a number above 0 (lm-eval's --limit: a count, or a fraction of each task below 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value
