"""The `rim-lens` command line: data, train, eval, demo, analyze, dashboard."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from rim_lens.errors import RimLensError

# Each module that owns a command group registers it here: (name, help, add_arguments).
# Handlers are attached with `parser.set_defaults(func=...)` and receive the parsed args.
Register = Callable[[argparse._SubParsersAction], None]


def build_parser() -> argparse.ArgumentParser:
    from rim_lens import commands

    parser = argparse.ArgumentParser(
        prog="rim-lens",
        description="Train Reasoning-in-Memory models and test whether their memory blocks "
        "carry the reasoning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.REGISTRY:
        register(sub)
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


if __name__ == "__main__":
    sys.exit(main())
