"""Data files: reading every format, errors naming file and line, atomic writes, the `data` CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rim_lens.cli import main
from rim_lens.data import Example, read_examples, write_examples
from rim_lens.data.tasks import get_task
from rim_lens.errors import ConfigError, DataError

MULT_LINE = (
    "5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 "
    "( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1"
)


@pytest.mark.parametrize(
    "relpath, task, count",
    [
        ("mult_4x4/valid.txt", "mult", 1000),
        ("mult_5x5/valid.txt", "mult", 1000),
        ("gsm8k/valid.txt", "gsm8k", 500),
        ("gsm8k/train.txt", "gsm8k", 6973),
        ("prosqa/valid.json", "prosqa", 300),
    ],
)
def test_reads_reference_files_guessing_the_task(reference_data, relpath, task, count):
    examples, skipped = read_examples(reference_data / relpath)
    assert (len(examples), skipped) == (count, 0)
    assert {ex.task for ex in examples} == {task}
    stem = Path(relpath).stem
    assert [ex.id for ex in examples[:2]] == [f"{stem}:1", f"{stem}:2"]
    assert len({ex.id for ex in examples}) == count


def test_gsm8k_question_with_unicode_line_separator(reference_data):
    # One training question contains U+2028, which str.splitlines would treat as a line break.
    examples, _ = read_examples(reference_data / "gsm8k" / "train.txt")
    odd = [ex for ex in examples if "\u2028" in ex.question]
    assert len(odd) == 1 and odd[0].id == "train:4479"


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(f"{MULT_LINE}\n\n{MULT_LINE}\n5 6 3 2 * 7 4 3 4||garbage #### 1\nno separators\n")
    with pytest.raises(DataError) as err:
        read_examples(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: expected steps '5 5 5 6 1 + ") and "\n" not in message
    examples, skipped = read_examples(path, skip_invalid=True)
    assert (len(examples), skipped) == (2, 2)
    assert [ex.id for ex in examples] == ["bad:1", "bad:3"]  # line numbers count blank lines


def test_task_given_or_not_guessable(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Is Tom a wumpus?||Tom is a yumpus. Every yumpus is a wumpus. #### Tom is a wumpus.\n")
    with pytest.raises(DataError, match=r"p.txt:1: cannot tell the task.*--task"):
        read_examples(path)
    (ex,), _ = read_examples(path, "prosqa")
    assert ex.values == ("yumpus", "wumpus")
    with pytest.raises(DataError, match="p.txt:1: expected two 4-digit operands"):
        read_examples(path, "mult")
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        read_examples(path, "nope")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_examples(tmp_path / "missing.txt")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        read_examples(tmp_path / "data.csv")
    (tmp_path / "bad.json").write_text(
        '[{"question": "q", "steps": ["A is a b."], "answer": "A is a b."},\n 3]'
    )
    with pytest.raises(DataError, match=r"bad.json: record 2: expected a record"):
        read_examples(tmp_path / "bad.json")


def test_jsonl_and_txt_round_trip(tmp_path, reference_data):
    examples = get_task("modchain", min_length=1, max_length=3).generate(50, seed=0)
    examples += read_examples(reference_data / "gsm8k" / "valid.txt")[0][:20]
    write_examples(tmp_path / "out" / "mixed.jsonl", examples)
    assert read_examples(tmp_path / "out" / "mixed.jsonl") == (examples, 0)
    write_examples(tmp_path / "chains.txt", examples[:50])
    back, _ = read_examples(tmp_path / "chains.txt")
    assert [ex.to_dict() | {"id": ""} for ex in back] == [ex.to_dict() | {"id": ""} for ex in examples[:50]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chains.txt", "out"]  # no temp files left


def test_jsonl_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    good = json.dumps(Example("1 +1 mod 10", ("2",), "2", (2,), "modchain", "a").to_dict())
    path.write_text("\n".join(['{"question": "q"}', "{oops", good]) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: expected an object with question, steps"):
        read_examples(path)
    assert [ex.id for ex in read_examples(path, skip_invalid=True)[0]] == ["a"]
    path.write_text(f"\n\n{good}\n")
    with pytest.raises(DataError, match=r"x.jsonl:3: expected task mult, got 'modchain'"):
        read_examples(path, "mult")


def test_cli_generate_then_validate(tmp_path, capsys):
    out = tmp_path / "train.txt"
    assert (
        main(["data", "generate", "mult", "--n", "30", "--seed", "4", "--out", str(out), "--option", "n=3"])
        == 0
    )
    assert f"wrote 30 mult(n=3) examples (seed 4) to {out}" in capsys.readouterr().out
    held_out = tmp_path / "test.jsonl"
    assert (
        main(
            [
                "data",
                "generate",
                "modchain",
                "--n",
                "20",
                "--out",
                str(held_out),
                "--option",
                "length=2",
                "--option",
                "operators=+-",
                "--exclude",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    for path, count, task in [(out, 30, "mult"), (held_out, 20, "modchain")]:
        assert main(["data", "validate", str(path)]) == 0
        assert capsys.readouterr().out == f"{path}: {count} examples, task {task}\n"


def test_cli_validate_reports_bad_lines(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_text(f"{MULT_LINE}\n{MULT_LINE[:-1]}7\n")
    assert main(["data", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"rim-lens: error: {path}:2: expected answer '5 5 6 0 8 2 0 1' for question '5 6 3 2 * 7 4 3 4'\n"
    )
    assert main(["data", "validate", str(path), "--skip-invalid"]) == 0
    assert capsys.readouterr().out == f"{path}: 1 examples, task mult, 1 invalid skipped\n"


def test_console_script_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("7 +5 *3 -2 mod 10||2 6 4 #### 5\n")
    script = Path(sys.executable).with_name("rim-lens")
    result = subprocess.run(
        [str(script), "data", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"rim-lens: error: {path}:1: expected answer '4' for question '7 +5 *3 -2 mod 10'\n"
    )


def test_generate_shows_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    out = tmp_path / "big.jsonl"
    assert main(["data", "generate", "modchain", "--n", "3000", "--out", str(out)]) == 0
    assert "generating modchain" in screen.getvalue() and "3000/3000" in screen.getvalue()
    monkeypatch.undo()
    # Not on a terminal (a log file, a pipe): no progress bar.
    assert main(["data", "generate", "modchain", "--n", "3000", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
