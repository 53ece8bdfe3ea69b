"""File helpers: atomic writes (readers never see half a file) and JSONL reading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rim_lens.errors import RunError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a file via a temporary sibling and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON record per non-blank line; RunError naming file:line for a corrupt one."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunError(f"{path}:{n}: corrupt JSON line ({err.msg})") from None
    return records
