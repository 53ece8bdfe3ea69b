"""Run directories: `runs/<name>/` with config, model, log, metrics, predictions and status.

`Run.status()` is the one place that says what state a run is in. A run marked `running` whose
process is gone (killed, machine rebooted) reads as `interrupted`: the status records the pid,
host and start time of the process that trains it. `RunLock` keeps two commands from writing one
run directory at once; it is an OS lock, so a killed process never leaves it held.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

from rim_lens import artefacts
from rim_lens.artefacts import PRODUCERS
from rim_lens.errors import ConfigError, RunError, clip
from rim_lens.fileio import append_line, atomic_write_json, old_path, read_json, read_jsonl, writing

# Status values. `interrupted` is also what a `running` status reads as once its process is gone;
# `diverged`: training met a non-finite loss or gradient and stopped, keeping its last checkpoint.
RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"
DIVERGED = "diverged"


# What rim-lens adds around a run name in its own files: `.NAME.lock`, `.NAME.next`, `.NAME.old`
# and the temporary `.NAME.1a2b3c4d.tmp` (fileio), the longest.
NAME_AFFIXES = len(".") + len(".12345678.tmp")


def name_limit(parent: str | Path = ".") -> int:
    """The longest run name in bytes under `parent`: its filesystem's limit on a file name (found
    from the nearest folder that exists) less what rim-lens adds around the name."""
    folder = Path(parent).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # what Linux and macOS filesystems take
    return limit - NAME_AFFIXES


def check_name(name: str, key: str = "name", parent: str | Path = ".") -> str:
    """A run name is one directory name under the runs directory `parent`: no separators, no `..`,
    not absolute, not hidden (names starting with "." are rim-lens's own staging and lock files),
    and short enough in bytes for the filesystem."""
    bad = (
        not name
        or name.startswith(".")
        or ".." in name
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    )
    if bad:
        raise ConfigError(
            f"{key}: {clip(repr(name))} is not a run name; give one folder name without path separators, "
            "'..' or a leading '.', e.g. mult-rim (--runs-dir chooses where it goes)"
        )
    size, limit = len(name.encode("utf-8", "surrogateescape")), name_limit(parent)
    if size > limit:
        raise ConfigError(
            f"{key}: {clip(repr(name), 40)} is {size} bytes, too long a run name: this filesystem takes "
            f"at most {limit} bytes (file names of {limit + NAME_AFFIXES} bytes, less rim-lens's own "
            f"affixes); give a shorter name"
        )
    return name


# -- processes -----------------------------------------------------------------------------------
def this_process() -> dict:
    """pid, host and start time of this process: enough to tell later whether it still runs."""
    import psutil

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": psutil.Process().create_time(),
    }


def process_alive(info: dict) -> bool | None:
    """Whether the process described by `info` (from `this_process`) still runs: None when it
    ran on another host (it cannot be checked from here)."""
    import psutil

    if info.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(info["pid"])).create_time()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    # A recycled pid belongs to a process started at another time.
    return abs(started - float(info.get("started") or 0)) < 1.0


# -- the run directory ---------------------------------------------------------------------------
class Run:
    """A run directory and the artefacts in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Called with each record `log` appends: experiment trackers (training/tracking.py).
        self.mirror: Callable[[dict], None] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_dir(self) -> Path:
        return self.path / artefacts.MODEL

    @property
    def analysis_dir(self) -> Path:
        return self.path / artefacts.ANALYSIS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / artefacts.CHECKPOINT

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def require(self, name: str) -> Path:
        """The artefact's path, or a RunError naming the command that produces it."""
        path = self.path / name
        if not path.exists():
            state = self.status()["status"]
            if state in (INTERRUPTED, RUNNING, DIVERGED) and name.split("/")[0] in (
                artefacts.MODEL,
                artefacts.METRICS,
                artefacts.PREDICTIONS,
            ):
                fix = (
                    "train it again with a lower learning rate and --restart (see its status.json)"
                    if state == DIVERGED
                    else "run its `rim-lens train` command again to resume it"
                )
                raise RunError(f"{self.path}: run is {state} and has no {name} yet; {fix}")
            fix = PRODUCERS.get(name.split("/")[0], "").format(run=self.path)
            hint = f"; produce it with `{fix}`" if fix else ""
            raise RunError(f"{self.path}: run has no {name}{hint}")
        return path

    def read_json(self, name: str) -> Any:
        path = self.require(name)
        fix = PRODUCERS.get(name.split("/")[0], "").format(run=self.path)
        return read_json(path, RunError, f"produce it again with `{fix}`" if fix else "")

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def status(self) -> dict:
        """The run's state: `status` is running, completed, failed, interrupted, diverged or unknown
        (no status.json). A `running` run whose process is gone reads as interrupted."""
        path = self.path / artefacts.STATUS
        if not path.exists():
            return {"status": "unknown"}
        status = read_json(path, RunError)
        if not isinstance(status, dict):
            raise RunError(f"{path}: corrupt status (expected a JSON object)")
        if status.get("status") == RUNNING and process_alive(status.get("process") or {}) is False:
            process = status["process"]
            status = dict(
                status,
                status=INTERRUPTED,
                error=f"process {process.get('pid')} on {process.get('host')} stopped without finishing",
            )
        return status

    def mark(self, status: str, **info: Any) -> None:
        """Record the run's state: running (with this process), completed, failed, interrupted or
        diverged."""
        if status == RUNNING:
            info["process"] = this_process()
        self.write_json(
            artefacts.STATUS, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        )

    def log(self, record: dict) -> None:
        append_line(self.path / artefacts.TRAIN_LOG, json.dumps(record))
        if self.mirror is not None:
            self.mirror(record)

    def read_log(self) -> list[dict]:
        return read_jsonl(self.require(artefacts.TRAIN_LOG))


def open_run(path: str | Path) -> Run:
    """An existing run directory (RunError if it is not one)."""
    run = Run(path)
    if not run.path.is_dir():
        raise RunError(f"{path}: no such run directory")
    if not (run.exists(artefacts.CONFIG) or run.exists(artefacts.MODEL)):
        raise RunError(f"{path}: not a rim-lens run (no config.yaml or model/)")
    return run


def staging_path(target: str | Path) -> Path:
    """Where `--overwrite` trains the replacement of `target` until it has succeeded."""
    target = Path(target)
    return target.with_name(f".{target.name}.next")


def recover_swap(target: str | Path) -> None:
    """Finish (or undo) an `--overwrite` swap cut short between its two renames: the completed
    replacement goes in if there is one, else the old run comes back."""
    target = Path(target)
    old, staging = old_path(target), staging_path(target)
    if not old.exists():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        return
    done = staging.is_dir() and Run(staging).status().get("status") == COMPLETED
    (staging if done else old).rename(target)
    shutil.rmtree(old, ignore_errors=True)


# -- locks ---------------------------------------------------------------------------------------
# Open a lock file without following a link, and without waiting on a FIFO (POSIX; Windows has
# neither flag, and the checks after opening refuse what is not a plain file of its own).
_NO_LINKS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
RECORD_WAIT = 2.0  # seconds a lock's holder has to write who it is before it counts as unknown


class RunLock:
    """An exclusive lock on one run name (the run and its staging directory), held while a command
    writes the run: `train` for all of its training, `eval` while it scores and writes its results.

    The lock is `.{name}.lock` beside the run, locked by the OS through `filelock` (flock on Unix)
    on a descriptor of our own: the OS releases it when its process ends, however it ends, so a
    stale lock file is simply taken over. The file records who holds it (command, pid, host,
    start time) for the message the next command gets. It is never followed if it is a link,
    nor written if it is not a plain file of its own.
    """

    def __init__(self, target: str | Path, command: str = "train") -> None:
        target = Path(target)
        self.target = target
        self.command = command
        self.path = target.with_name(f".{target.name}.lock")
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self, wait_for: tuple[str, ...] = (), poll: float = 0.05) -> RunLock:
        """Take the lock; while a command named in `wait_for` holds it, wait; else RunError."""
        # A runs folder made only for the lock goes again with it (a refused command leaves nothing).
        self._made = [] if self.path.parent.is_dir() else [self.path.parent]
        with writing(self.target):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        unnamed = time.monotonic() + RECORD_WAIT
        while True:
            fd = self._open()
            if not filelock.lock_descriptor(fd, blocking=False):
                holder = _read_holder(fd)
                os.close(fd)
                # No record yet: the holder has just locked and not yet written who it is.
                if (not holder and time.monotonic() < unnamed) or holder.get("command") in wait_for:
                    time.sleep(poll)
                    continue
                command = f"`rim-lens {holder['command']}`" if holder.get("command") else "rim-lens command"
                raise RunError(
                    f"{self.target}: another {command} is writing this run ({_describe(holder)}); "
                    "wait for it to finish, or stop it and run this command again"
                ) from None
            # The holder before us may have removed the file between our open and our lock.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {**this_process(), "command": self.command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            with writing(self.target):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(record).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _open(self) -> int:
        """The lock file, opened without following a link; RunError if it is not a plain file
        of its own (a link, a hard link to another file, a device)."""
        refused = RunError(
            f"{self.path}: is not a lock file of rim-lens's own (a link, or not a plain file); "
            "rim-lens does not write through it: remove it and run the command again"
        )
        try:
            with writing(self.target):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NO_LINKS, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise refused from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise refused
        return fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            for folder in self._made:
                with contextlib.suppress(OSError):  # not empty: a run was made in it
                    folder.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        # os.pread, where Windows has none: read from the start, leave the offset there.
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        os.lseek(fd, 0, os.SEEK_SET)
    except (ValueError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(holder: dict) -> str:
    try:
        return f"pid {holder['pid']} on {holder['host']}, since {holder['time']}"
    except KeyError:
        return "holder unknown"
