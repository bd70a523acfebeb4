"""Argument types of the command line: a bad number is refused by argparse, naming the option."""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["int_at_least", "positive_int", "nonneg_int"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
