"""Argument parsing shared by the commands: one-line errors and checked numbers."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

MAX_MESSAGE = 300  # characters of an error line


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `rim-lens: error: ...; see rim-lens CMD --help`."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


PREFIX = "rim-lens: error: "


def fail(message: str) -> NoReturn:
    print(error_line(message), file=sys.stderr)
    sys.exit(2)


def error_line(message: object, limit: int = MAX_MESSAGE) -> str:
    """`rim-lens: error: message` on one line of at most `limit` characters; a long message loses
    its middle, so both where (the start) and what to do (the end) survive."""
    text = " ".join(str(message).split())
    limit -= len(PREFIX)
    if len(text) > limit:
        keep = limit - 5
        text = f"{text[: keep * 2 // 3]} […] {text[len(text) - keep // 3 :]}"
    return PREFIX + text


def number(kind: type = int, low: float | None = None, high: float | None = None, name: str = ""):
    """An argparse type: a `kind` number in [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text[:40]!r}"
            ) from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = name or kind.__name__
    return parse


positive_int = number(int, 1, name="positive integer")
