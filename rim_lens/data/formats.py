"""The file formats examples are read from and written to: iCoT lines, JSONL, ProsQA JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from rim_lens.data.examples import Example
from rim_lens.data.tasks import TASK_NAMES, get_task, infer_task
from rim_lens.errors import DataError
from rim_lens.fileio import atomic_write_text

_FIELDS = ("question", "steps", "answer", "values", "task")


def read_examples(
    path: str | Path, task: str | None = None, *, skip_invalid: bool = False, task_options: dict | None = None
) -> tuple[list[Example], int]:
    """The examples in a data file and the number of invalid lines or records skipped.

    By suffix: `.txt` iCoT lines `question||steps #### answer` (the task is guessed from the first
    line unless given), `.jsonl` one `Example.to_dict()` per line, `.json` a ProsQA list. An
    invalid line raises DataError "file:line: what was expected", unless `skip_invalid`.
    Examples get ids "{file stem}:{line or record number}"; `.jsonl` records keep their own.
    """
    path = Path(path)
    try:
        # newline="" keeps a stray "\r" inside a line; str.splitlines would also split at the
        # "\u2028" that one GSM8K question contains, so lines are split at "\n" only.
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    items: list[tuple[int, Any]] = lines
    parse: Callable[[Any], Example]

    if path.suffix == ".txt":
        if not lines:
            return [], 0
        reader = infer_task(lines[0][1], task, **(task_options or {}))
        if reader is None:
            raise DataError(
                f"{path}:{lines[0][0]}: cannot tell the task of this line; give it "
                f"with --task ({', '.join(TASK_NAMES)})"
            )
        parse = reader.parse_line
    elif path.suffix == ".jsonl":
        parse = partial(_from_json_line, task=task, task_names=TASK_NAMES)
    elif path.suffix == ".json":
        if task not in (None, "prosqa"):
            raise DataError(f"{path}: .json files hold ProsQA records, not task {task}")
        parse = get_task("prosqa", **(task_options or {})).from_record
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}: expected a JSON list of ProsQA records ({err.msg})"
            ) from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of ProsQA records")
        items = list(enumerate(records, 1))
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r}; expected .txt, .jsonl or .json")

    examples, skipped = [], 0
    for n, item in items:
        try:
            ex = parse(item)
        except ValueError as err:
            if not skip_invalid:
                where = f"{path}: record {n}" if path.suffix == ".json" else f"{path}:{n}"
                raise DataError(f"{where}: {err}") from None
            skipped += 1
            continue
        examples.append(ex if ex.id else replace(ex, id=f"{path.stem}:{n}"))
    return examples, skipped


def _from_json_line(line: str, task: str | None, task_names: Iterable[str]) -> Example:
    """The example on one `.jsonl` line, if it holds a well-formed record of a known task."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON object ({err.msg})") from None
    if not (
        isinstance(record, dict)
        and all(k in record for k in _FIELDS)
        and all(isinstance(record[k], str) for k in ("question", "answer", "task"))
        and all(isinstance(record[k], list) for k in ("steps", "values"))
    ):
        raise ValueError(f"expected an object with {', '.join(_FIELDS)}")
    expected = [task] if task else list(task_names)
    if record["task"] not in expected:
        raise ValueError(f"expected task {' or '.join(expected)}, got {record['task']!r}")
    return Example.from_dict(record)


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples as `.txt` iCoT lines or `.jsonl` records, atomically (all or nothing).

    `.txt` keeps what a line holds (no ids, no meta); `.jsonl` keeps everything.
    """
    path = Path(path)
    if path.suffix == ".txt":
        # A task's line format does not depend on its options, so the defaults serve every example.
        tasks: dict = {}
        lines = []
        for ex in examples:
            if ex.task not in tasks:
                tasks[ex.task] = get_task(ex.task)
            line = tasks[ex.task].format_line(ex)
            if "\n" in line or "\r" in line:
                raise DataError(f"{path}: example {ex.id or ex.question[:40]!r} does not fit on a line")
            lines.append(line)
    elif path.suffix == ".jsonl":
        lines = [json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples]
    else:
        raise DataError(f"{path}: cannot write {path.suffix!r} files; use .txt or .jsonl")
    # A crash mid-write must not leave a truncated file that later reads as a smaller data set.
    atomic_write_text(path, "".join(line + "\n" for line in lines))
