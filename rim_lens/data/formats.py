"""The file formats examples are read from and written to: iCoT lines, JSONL, ProsQA JSON."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from rim_lens.data.examples import Example
from rim_lens.data.tasks import TASK_NAMES, Task, get_task, infer_task
from rim_lens.errors import DataError, clip
from rim_lens.fileio import atomic_write_text, iter_lines, read_text

_FIELDS = ("question", "steps", "answer", "values", "task")


MAX_JSON = 64 << 20  # characters of a ProsQA .json file (its training split is about 31 MB)


def read_examples(
    path: str | Path, task: str | None = None, *, skip_invalid: bool = False, task_options: dict | None = None
) -> tuple[list[Example], int]:
    """The examples in a data file and the number of invalid lines or records skipped.

    By suffix: `.txt` iCoT lines `question||steps #### answer` (the task is guessed from the first
    line unless given), `.jsonl` one `Example.to_dict()` per line, `.json` a ProsQA list. Every
    example is checked against its task's rules whatever the format (a wrong step or answer is
    invalid). An invalid line raises DataError "file:line: what was expected", unless
    `skip_invalid`; a file without any valid example is an error too. Lines are read as a stream
    of at most `MAX_LINE` characters each.
    Examples get ids "{file stem}:{line or record number}"; `.jsonl` records keep their own.
    """
    path = Path(path)
    options = task_options or {}
    items: Iterable[tuple[int, Any]]
    parse: Callable[[Any], Example]
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a data file (.txt, .jsonl or .json)")
    if path.suffix == ".txt":
        items, parse = _txt_items(path, task, options)
    elif path.suffix == ".jsonl":
        readers: dict[str, Task] = {}
        parse = partial(_from_json_line, task=task, options=options, readers=readers)
        items = ((n, line) for n, line in iter_lines(path, DataError) if line.strip())
    elif path.suffix == ".json":
        items, parse = _prosqa_items(path, task, options)
    else:
        raise DataError(f"{path}: unknown format {clip(path.suffix)!r}; expected .txt, .jsonl or .json")

    examples, skipped = [], 0
    for n, item in items:
        try:
            ex = parse(item)
        except ValueError as err:
            if not skip_invalid:
                where = f"{path}: record {n}" if path.suffix == ".json" else f"{path}:{n}"
                raise DataError(f"{where}: {clip(err, 200)}") from None
            skipped += 1
            continue
        examples.append(ex if ex.id else replace(ex, id=f"{path.stem}:{n}"))
    if not examples:
        found = f"all {skipped} invalid" if skipped else "the file is empty"
        raise DataError(f"{path}: no examples ({found}); give a data file with valid examples")
    return examples, skipped


def _txt_items(path: Path, task: str | None, options: dict) -> tuple[Iterable[tuple[int, str]], Callable]:
    """The numbered non-blank lines of an iCoT `.txt` file, read as a stream, and the parser of
    their task (guessed from the first line unless given)."""
    # Split at "\n" only: str.splitlines would also split at the "\u2028" of one GSM8K question.
    lines = ((n, line.removesuffix("\r")) for n, line in iter_lines(path, DataError) if line.strip())
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path}: no examples (the file is empty); give a data file with examples")
    reader = infer_task(first[1], task, **options)
    if reader is None:
        raise DataError(
            f"{path}:{first[0]}: cannot tell the task of this line; give it "
            f"with --task ({', '.join(TASK_NAMES)})"
        )
    return itertools.chain([first], lines), reader.parse_line


def _prosqa_items(path: Path, task: str | None, options: dict) -> tuple[Iterable[tuple[int, Any]], Callable]:
    """The numbered records of a ProsQA `.json` list, and their parser."""
    if task not in (None, "prosqa"):
        raise DataError(f"{path}: .json files hold ProsQA records, not task {task}")
    parse = get_task("prosqa", **options).from_record
    text = read_text(path, DataError, limit=MAX_JSON)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: expected a JSON list of ProsQA records ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of ProsQA records")
    return enumerate(records, 1), parse


def _from_json_line(line: str, task: str | None, options: dict, readers: dict[str, Task]) -> Example:
    """The example on one `.jsonl` line: a well-formed record of a known task whose steps, answer
    and values are what that task makes of its question (checked exactly as for `.txt` lines)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON object ({err.msg})") from None
    if not (
        isinstance(record, dict)
        and all(k in record for k in _FIELDS)
        and all(isinstance(record[k], str) for k in ("question", "answer", "task"))
        and all(isinstance(record[k], list) for k in ("steps", "values"))
        and all(isinstance(s, str) for s in record["steps"])
        and isinstance(record.get("id", ""), str)
        and isinstance(record.get("meta", {}), dict)
    ):
        raise ValueError(f"expected an object with {', '.join(_FIELDS)} (steps a list of strings)")
    expected = [task] if task else list(TASK_NAMES)
    if record["task"] not in expected:
        raise ValueError(f"expected task {' or '.join(expected)}, got {clip(repr(record['task']))}")
    # Options a question implies (mult's n, modchain's modulus) fill in those not given.
    reader = infer_task(record["question"], record["task"], **options)
    key = repr(reader)
    reader = readers.setdefault(key, reader)
    made = reader.make_example(record["question"], record["steps"], record["answer"])
    if list(made.values) != record["values"]:
        raise ValueError(
            f"expected values {clip(list(made.values))} for these steps, got {clip(record['values'])}"
        )
    return replace(made, id=record.get("id", ""), meta=record.get("meta", {}))


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples as `.txt` iCoT lines or `.jsonl` records, atomically (all or nothing).

    `.txt` keeps what a line holds (no ids, no meta); `.jsonl` keeps everything.
    """
    # A crash mid-write must not leave a truncated file that later reads as a smaller data set.
    atomic_write_text(path, "".join(line + "\n" for line in format_lines(path, examples)))


def format_lines(path: str | Path, examples: Iterable[Example]) -> list[str]:
    """The lines `write_examples` writes for `examples` into a file named `path`."""
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
                raise DataError(f"{path}: example {clip(ex.id or ex.question, 40)!r} does not fit on a line")
            lines.append(line)
        return lines
    if path.suffix == ".jsonl":
        return [json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples]
    raise DataError(f"{path}: cannot write {path.suffix!r} files; use .txt or .jsonl")
