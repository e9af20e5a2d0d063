"""Command-line helpers shared by tools/bench_*.py."""

from __future__ import annotations

import argparse


def positive_int_list(text: str) -> list[int]:
    """argparse type for ``1,16,256``: a non-empty list of positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,16,256")
    return values
