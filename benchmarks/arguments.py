"""Argument types shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more, refused with a message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a whole number of 1 or more")
    return value
