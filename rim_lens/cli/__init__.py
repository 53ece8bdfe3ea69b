"""The `rim-lens` command line: data, train, eval, demo, analyze, dashboard.

Every bad input ends the same way: one line `rim-lens: error: <what, where, what to do>` on
stderr and exit status 2, never a traceback (argparse's own errors included).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from rim_lens.errors import RimLensError

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
non_negative_int = number(int, 0, name="non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    # Each command module adds its subparser and sets `func`, the handler of the parsed args.
    from rim_lens.cli import analyze, dashboard, data, demo, train

    parser = Parser(
        prog="rim-lens",
        description="Train Reasoning-in-Memory models and test whether their memory blocks "
        "carry the reasoning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, train, demo, analyze, dashboard):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a one-line usage error already printed
        return int(done.code or 0)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except RimLensError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(
            f"rim-lens: interrupted ({name}); a training run resumes when its command runs again",
            file=sys.stderr,
        )
        return 128 + signum


def _quiet_libraries() -> None:
    """Hide weight-loading progress bars: rim-lens loads small local checkpoints all the time."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
