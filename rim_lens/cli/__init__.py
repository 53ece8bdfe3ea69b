"""The `rim-lens` command line: data, model, train, eval, demo, analyze, dashboard.

Every bad input ends the same way: one line `rim-lens: error: <what, where, what to do>` on
stderr and exit status 2, never a traceback (argparse's own errors included).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from rim_lens.cli.args import Parser, error_line
from rim_lens.errors import RimLensError
from rim_lens.fileio import storage_errno, storage_error
from rim_lens.progress import log_to_stderr


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `argv`: the analyses' subcommands are built only for `rim-lens analyze`
    (they load the Lab, which other commands should not wait for)."""
    # Each command module adds its subparser and sets `func`, the handler of the parsed args.
    from rim_lens import __version__
    from rim_lens.cli import analyze, dashboard, data, demo, model, train

    parser = Parser(
        prog="rim-lens",
        description="Train Reasoning-in-Memory models and test whether their memory blocks "
        "carry the reasoning.",
    )
    parser.add_argument("--version", action="version", version=f"rim-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines, only results")
    for module in (data, model, train, demo, dashboard):
        module.register(sub)
    command = [str(a) for a in argv or [] if not str(a).startswith("-")][:1]
    analyze.register(sub, full=command == ["analyze"])
    _everywhere(parser, "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _everywhere(parser: argparse.ArgumentParser, *flags: str, **options) -> None:
    """Accept `flags` after any (sub)command too (`rim-lens train R.yaml --quiet`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.add_argument(*flags, **options)
                _everywhere(child, *flags, **options)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a one-line usage error already printed
        return int(done.code or 0)
    _quiet_libraries()
    log_to_stderr(args.quiet)
    # A file over the size limit (ulimit -f) is then an error a write reports, not a signal that
    # kills the process without a word.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return int(args.func(args) or 0)
    except RimLensError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - only a write the storage refused; the rest is a bug
        code = storage_errno(err)
        if code is None:
            raise
        print(error_line(storage_error(getattr(err, "filename", None) or "a file", code)), file=sys.stderr)
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
