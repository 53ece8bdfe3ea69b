"""File helpers: atomic writes that follow the umask, and bounded, checked reads.

Writes go to a temporary sibling that is renamed over the target, so a reader (or a run killed
mid-write) never sees half a file. A write the storage refuses (disk full, file too large,
read-only, not permitted) is a `StorageError`: one line naming the path, the old file intact. Reads
stream and cap what they hold: a line longer than `MAX_LINE` characters or a file longer than
its cap is an error naming the file, never a MemoryError. Every reader raises the caller's error
class (DataError for data, RunError for run files) with one line: what is wrong, where, and what
to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rim_lens.errors import RimLensError, RunError

MAX_LINE = 1 << 20  # characters in one line of a data or log file
MAX_TEXT = 64 << 20  # characters in a whole JSON or YAML file


# -- storage errors ------------------------------------------------------------------------------
# What a refused write means: the storage is full (or the file over its size limit), or it cannot
# be written at all.
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class StorageError(RunError):
    """The storage refused a write: full, over a size limit, read-only or not permitted."""


def storage_errno(err: BaseException) -> int | None:
    """The errno of a refused write behind `err` (an OSError, or a library's error quoting one,
    as safetensors' "os error 28" does), or None if `err` is no such error."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"(?:errno|Errno|code:|os error)\s*(\d+)", str(err))
        code = int(found[1]) if found else None
    return code if code in FULL + READ_ONLY else None


def storage_error(where: object, code: int) -> StorageError:
    """The one line for a write to `where` refused with `code`."""
    fix = (
        "free some space (or raise the file-size limit)"
        if code in FULL
        else "make it writable (or work on a copy elsewhere)"
    )
    return StorageError(
        f"{where}: cannot write ({os.strerror(code)}); {fix} and run the same command again: "
        "what was written before is unchanged"
    )


@contextlib.contextmanager
def writing(where: str | Path) -> Iterator[None]:
    """Turn a refused write inside the block into a StorageError naming `where`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, or a library's own error quoting the errno
        code = storage_errno(err)
        if code is None:
            raise
        raise storage_error(where, code) from None


# -- writes --------------------------------------------------------------------------------------
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def is_temp(path: str | Path) -> bool:
    """Whether `path` is a temporary sibling of these writers (what a killed write leaves)."""
    return re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", Path(path).name) is not None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary sibling of `path`, then it is renamed over `path`, so readers
    never see half a file (for writers that take a path: pyarrow, safetensors)."""
    path = Path(path)
    tmp = _temp_name(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only folder refuses even that
                tmp.unlink(missing_ok=True)
            raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file via a temporary sibling and rename, so readers never see half of it.

    The file is created with mode 0o666 minus the umask, like any file `open` creates.
    """

    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_many(files: dict[Path, bytes]) -> None:
    """Write several files as `atomic_write_bytes` does, all of them before any is renamed into
    place: a refused write leaves every one of them as it was."""
    temps = {}
    try:
        for path, data in files.items():
            temps[path] = tmp = _temp_name(Path(path))
            with writing(path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                    f.write(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log in a single write: a killed process leaves no half line."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def temp_dir(final: str | Path) -> Path:
    """A new empty directory beside `final` (mode 0o777 minus the umask), to be filled and then
    moved into place with `replace_dir`."""
    final = Path(final)
    tmp = _temp_name(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o777)
    return tmp


def umask() -> int:
    """The process's umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: str | Path) -> None:
    """Give every file and folder under `directory` the mode a plain `open`/`mkdir` would have:
    libraries that write through temporary files (safetensors, mkdtemp) leave 0600/0700 behind."""
    mask = umask()
    for dirpath, _, filenames in os.walk(directory):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def old_path(final: str | Path) -> Path:
    """Where `replace_dir` parks the directory it replaces until the new one is in place."""
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished directory `tmp` to `final`, replacing what was there.

    Between the two renames `final` is briefly missing; `recover_dir` puts the old copy back
    if a crash falls exactly there.
    """
    tmp, final = Path(tmp), Path(final)
    old = old_path(final)
    with writing(final):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_dir(path: str | Path) -> None:
    """Remove a directory as one step: renamed to a temporary sibling first, so a kill midway
    leaves no half-deleted directory under its name."""
    path = Path(path)
    tmp = _temp_name(path)
    with writing(path):
        path.rename(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(final: str | Path) -> None:
    """Undo a `replace_dir` cut short between its renames (the old copy comes back)."""
    final = Path(final)
    old = old_path(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


# -- reads ---------------------------------------------------------------------------------------
def _fail(error: type[RimLensError], message: str, fix: str) -> RimLensError:
    return error(f"{message}; {fix}" if fix else message)


def iter_lines(
    path: str | Path, error: type[RimLensError] = RunError, fix: str = "", limit: int = MAX_LINE
) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line of a UTF-8 text file, split at "\\n" only (a stray "\\r"
    or "\\u2028" stays inside its line), read as a stream with at most `limit` characters a line."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8", newline="\n")
    except FileNotFoundError:
        raise _fail(error, f"{path}: no such file", fix) from None
    except OSError as err:
        raise _fail(error, f"{path}: cannot read ({err.strerror})", fix) from None
    n = 0
    with f:
        while True:
            n += 1
            try:
                line = f.readline(limit + 1)
            except UnicodeDecodeError:
                raise _fail(error, f"{path}:{n}: not UTF-8 text", fix) from None
            except OSError as err:
                raise _fail(error, f"{path}:{n}: cannot read ({err.strerror})", fix) from None
            if not line:
                return
            if len(line) > limit and not line.endswith("\n"):
                raise _fail(
                    error, f"{path}:{n}: line longer than {limit:,} characters; is this the right file?", fix
                )
            yield n, line.removesuffix("\n")


def read_text(
    path: str | Path, error: type[RimLensError] = RunError, fix: str = "", limit: int = MAX_TEXT
) -> str:
    """A whole UTF-8 text file of at most `limit` characters."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read(limit + 1)
    except FileNotFoundError:
        raise _fail(error, f"{path}: no such file", fix) from None
    except IsADirectoryError:
        raise _fail(error, f"{path}: is a directory, not a file", fix) from None
    except UnicodeDecodeError:
        raise _fail(error, f"{path}: not UTF-8 text", fix) from None
    except OSError as err:
        raise _fail(error, f"{path}: cannot read ({err.strerror})", fix) from None
    if len(text) > limit:
        raise _fail(error, f"{path}: longer than {limit:,} characters; is this the right file?", fix)
    return text


def read_json(path: str | Path, error: type[RimLensError] = RunError, fix: str = "") -> Any:
    """A JSON file; one-line error naming file:line if it is corrupt."""
    text = read_text(path, error, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(error, f"{path}:{err.lineno}: corrupt JSON ({err.msg})", fix) from None
    except RecursionError:
        raise _fail(error, f"{path}: corrupt JSON (nested too deeply)", fix) from None


def read_jsonl(path: str | Path, error: type[RimLensError] = RunError, fix: str = "") -> list[dict]:
    """One JSON record per non-blank line; one-line error naming file:line for a corrupt one."""
    records = []
    for n, line in iter_lines(path, error, fix):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise _fail(error, f"{path}:{n}: corrupt JSON line ({err.msg})", fix) from None
    return records


def check_safetensors(path: str | Path, error: type[RimLensError] = RunError, fix: str = "") -> None:
    """Error unless `path` is a complete safetensors file: its header parses and the file is as
    long as the header says (a truncated copy or an interrupted write is caught here, before
    any loader sees it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            header = json.loads(f.read(n)) if n is not None and 8 + n <= size else None
    except FileNotFoundError:
        raise _fail(error, f"{path}: no such file", fix) from None
    except OSError as err:
        raise _fail(error, f"{path}: cannot read ({err.strerror})", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise _fail(error, f"{path}: not a safetensors file (unreadable header)", fix)
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError):
        raise _fail(error, f"{path}: not a safetensors file (malformed header)", fix) from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise _fail(error, f"{path}: truncated ({size:,} of {expected:,} bytes)", fix)
