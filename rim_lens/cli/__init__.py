"""The `rim-lens` command line: data, model, train, eval, demo, analyze, dashboard."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rim_lens.errors import RimLensError


def build_parser() -> argparse.ArgumentParser:
    # Each command module adds its subparser and sets `func`, the handler of the parsed args.
    from rim_lens.cli import analyze, dashboard, data, demo, model, train

    parser = argparse.ArgumentParser(
        prog="rim-lens",
        description="Train Reasoning-in-Memory models and test whether their memory blocks "
        "carry the reasoning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, model, train, demo, analyze, dashboard):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except RimLensError as err:
        print(f"rim-lens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rim-lens: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Hide weight-loading progress bars: rim-lens loads small local checkpoints all the time."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
