"""Library messages and progress: the `rim_lens` logger, and progress that suits where stderr goes.

On a terminal a stage of work shows a tqdm bar. When stderr is a file or a pipe, a redrawn bar
would write carriage returns into it (a training log piped to a file grew to 600 kB of them), so
each stage of a second or more logs one line when it ends instead (and one per named step). `quiet` (the CLI's
`--quiet`, or RIM_LENS_QUIET=1, which subprocesses inherit) silences both; TQDM_DISABLE=1
silences the bars only. Library messages go through `logger`; the CLI sends them to stderr
(`log_to_stderr`), a Python user configures `logging` as they like.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

logger = logging.getLogger("rim_lens")
QUIET_ENV = "RIM_LENS_QUIET"
LINE_AFTER = 1.0  # seconds: off a terminal, a stage ending sooner writes no line
T = TypeVar("T")


def quiet() -> bool:
    """Whether progress and informational messages are off (`--quiet`)."""
    return os.environ.get(QUIET_ENV, "") == "1"


def set_quiet(value: bool) -> None:
    """Turn progress and informational messages off or on, here and in child processes."""
    if value:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)
    logger.setLevel(logging.WARNING if value else logging.INFO)


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives (tests and notebooks replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Format())

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it in __init__
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"rim-lens: {record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


_HANDLER = _Stderr()


def log_to_stderr(quiet_: bool = False) -> None:
    """Send the library's messages to stderr, informational ones unless `quiet_` or RIM_LENS_QUIET=1
    (the CLI calls this once per command; calling it again changes nothing but the level)."""
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
        logger.propagate = False
    set_quiet(quiet_ or quiet())


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress(tqdm):
    """A tqdm bar on a terminal; elsewhere one log line per stage (and per `step`); nothing when quiet."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", **kwargs: Any) -> None:
        self._lines = not kwargs.get("disable") and not quiet() and not _terminal()
        if quiet() or self._lines:
            kwargs["disable"] = True
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(iterable, desc=desc, **kwargs)
        self._stage, self._unit = desc, kwargs.get("unit", "it")
        self._start, self._steps, self._logged = time.perf_counter(), 0, False

    def __iter__(self) -> Iterator:
        yield from super().__iter__()
        self.close()

    def step(self, name: str) -> None:
        """One named step of the stage done: the bar moves on (showing `name`); in a file, a line."""
        self._steps += 1
        if self._lines:
            of = f"/{self.total}" if self.total else ""
            logger.info("%s: %s done (%d%s, %.0f s)", self._stage, name, self._steps, of, self._elapsed())
        self.set_postfix_str(name, refresh=False)
        self.update(1)

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start

    def close(self) -> None:
        if self._lines and not self._logged and (self._steps or self._elapsed() >= LINE_AFTER):
            self._logged = True
            size = f", {self.total} x {self._unit}" if self.total else ""
            logger.info("%s: done in %.1f s%s", self._stage, self._elapsed(), size)
        super().close()


def progress(iterable: Iterable[T] | None = None, desc: str = "", **kwargs: Any) -> Progress:
    """A `Progress` over `iterable` (or a manual one with `total=`), e.g.
    `for batch in progress(batches, desc="capture", unit="shard")`."""
    if iterable is not None and "total" not in kwargs and hasattr(iterable, "__len__"):
        kwargs["total"] = len(iterable)
    return Progress(iterable, desc=desc, **kwargs)
