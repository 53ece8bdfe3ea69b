"""Tasks: line formats against the reference iCoT files in data/, generators, corruption and answer checks."""

from __future__ import annotations

import random
import sys
import time
import types
from dataclasses import replace

import pytest

from rim_lens.data import read_examples
from rim_lens.data.tasks import TASK_NAMES, get_task, infer_task
from rim_lens.data.tasks.gsm8k import load_hub
from rim_lens.errors import ConfigError, DataError, RimLensError


def rule_line(a: int, b: int, n: int) -> str:
    """The iCoT line of a * b, written straight from the rule in data/README.md."""

    def rev(x: int, width: int) -> str:
        return " ".join(reversed(str(x).zfill(width)))

    items, total = [], 0
    for i in range(n):
        partial = a * (b // 10**i % 10) * 10**i
        total += partial
        items.append(rev(partial, n + 1 + i) + (f" ( {rev(total, n + 1 + i)} )" if 0 < i < n - 1 else ""))
    return f"{rev(a, n)} * {rev(b, n)}||{' + '.join(items)} #### {rev(a * b, 2 * n)}"


def same(a, b) -> bool:
    """Equal apart from the id."""
    return replace(a, id="") == replace(b, id="")


def operands(question: str) -> tuple[int, int]:
    return tuple(int("".join(reversed(o.split()))) for o in question.split(" * "))


# --- mult -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5])
def test_mult_recomputes_every_reference_line(reference_data, n):
    task = get_task("mult", n=n)
    lines = (reference_data / f"mult_{n}x{n}" / "valid.txt").read_text().splitlines()
    assert len(lines) == 1000
    for line in lines:
        question = line.partition("||")[0]
        ex = task.parse_question(question)
        assert task.format_line(ex) == line
        assert task.parse_line(line) == ex
        a, b = operands(question)
        assert len(str(a)) == len(str(b)) == n  # operands have a nonzero leading digit
        assert task.derived_values(ex)["running_sum"][-1] == a * b and len(ex.values) == len(ex.steps) == n


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 9])
def test_generated_mult_lines_follow_the_rule(n):
    task = get_task("mult", n=n)
    examples = task.generate(40, seed=n)
    assert len({ex.question for ex in examples}) == 40
    for i, ex in enumerate(examples):
        line = task.format_line(ex)
        assert line == rule_line(*operands(ex.question), n)
        assert same(task.parse_line(line), ex)
        assert ex.id == f"mult-{n}-{i}"
        assert all(len(str(x)) == n for x in operands(ex.question))
        partials = [int("".join(reversed(step.split(" ( ")[0].split()))) for step in ex.steps]
        assert list(ex.values) == partials  # each step's own quantity, as written
        assert list(task.derived_values(ex)["running_sum"]) == [sum(partials[: i + 1]) for i in range(n)]


def test_mult_rejects_inconsistent_lines():
    task = get_task("mult", n=4)
    line = (
        "5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 "
        "( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1"
    )
    task.parse_line(line)
    with pytest.raises(ValueError, match="expected steps"):
        task.parse_line(line.replace("5 5 5 6 1 +", "5 5 5 6 2 +"))
    with pytest.raises(ValueError, match="expected answer '5 5 6 0 8 2 0 1'"):
        task.parse_line(line[:-1] + "2")
    for bad in ["5 6 3 * 7 4 3 4", "5 6 3 0 * 7 4 3 4", "5 6 3 2 x 7 4 3 4", "56 3 2 * 7 4 3 4"]:
        with pytest.raises(ValueError, match="4-digit operands"):
            task.parse_question(bad)


# --- modchain ---------------------------------------------------------------------------------


def test_modchain_line_format():
    task = get_task("modchain")
    ex = task.parse_line("7 +5 *3 -2 mod 10||2 6 4 #### 4")
    assert ex.steps == ("2", "6", "4") and ex.answer == "4" and ex.values == (2, 6, 4)
    assert task.format_line(ex) == "7 +5 *3 -2 mod 10||2 6 4 #### 4"
    assert task.parse_question("7 +5 *3 -2 mod 10") == ex
    with pytest.raises(ValueError, match="expected steps '2 6 4'"):
        task.parse_line("7 +5 *3 -2 mod 10||2 6 5 #### 5")
    for bad in ["7 +5 mod 7", "07 +5 mod 10", "7 +12 mod 10", "7 /5 mod 10", "7 mod 10"]:
        with pytest.raises(ValueError, match="expected a question like"):
            task.parse_question(bad)
    assert get_task("modchain", operators="+").chance_accuracy() == 0.1
    with pytest.raises(ValueError, match="operators from '\\+'"):
        get_task("modchain", operators="+").parse_question("7 *5 mod 10")


def test_modchain_generation_is_deterministic_distinct_and_consistent():
    task = get_task("modchain", length=3, modulus=7)
    examples = task.generate(500, seed=11)
    assert examples == task.generate(500, seed=11)
    assert examples != task.generate(500, seed=12)
    assert len({ex.question for ex in examples}) == 500
    for ex in examples:
        assert len(ex.steps) == 3 and all(0 <= v < 7 for v in ex.values)
        assert same(task.parse_line(task.format_line(ex)), ex)


def test_modchain_generation_respects_exclude():
    task = get_task("modchain", length=2)
    exclude = {ex.question for ex in task.generate(2000, seed=0)}
    fresh = task.generate(500, seed=1, exclude=exclude)
    assert len(fresh) == 500 and not exclude & {ex.question for ex in fresh}
    # 300 * 30 = 9000 questions of length 2: drawing all that remain must work exactly.
    rest = task.generate(9000 - len(exclude), seed=2, exclude=exclude)
    assert len({ex.question for ex in rest} | exclude) == 9000
    with pytest.raises(DataError, match="9000 distinct questions of length 2 \\(2000 of them excluded\\)"):
        task.generate(7001, seed=2, exclude=exclude)


def test_modchain_too_small_question_space_fails_fast():
    start = time.perf_counter()
    with pytest.raises(DataError, match="only 300 distinct questions"):
        get_task("modchain", length=1).generate(1000, seed=0)
    assert time.perf_counter() - start < 1
    assert len(get_task("modchain", length=1).generate(300, seed=0)) == 300


def test_modchain_variable_length():
    task = get_task("modchain", min_length=2, max_length=5)
    assert task.options == {"min_length": 2, "max_length": 5, "modulus": 10, "operators": "+-*"}
    lengths = [len(ex.steps) for ex in task.generate(400, seed=0)]
    assert set(lengths) == {2, 3, 4, 5} and min(lengths.count(k) for k in range(2, 6)) > 60
    # Parsing accepts any chain length; the length options only shape generation.
    assert get_task("modchain").parse_question("1 +1 mod 10").answer == "2"
    for bad in [
        dict(length=3, min_length=1, max_length=2),
        dict(min_length=2),
        dict(min_length=3, max_length=2),
        dict(length=0),
        dict(modulus=1),
        dict(operators="+/"),
    ]:
        with pytest.raises(ConfigError, match="task modchain"):
            get_task("modchain", **bad)


# --- corrupt ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [("mult", {"n": 4}), ("mult", {"n": 2}), ("modchain", {"length": 4}), ("modchain", {"modulus": 3})],
)
def test_corrupt_changes_one_value_and_the_answer(name, options):
    task, rng, uncorruptible = get_task(name, **options), random.Random(0), 0
    for ex in task.generate(100, seed=3):
        try:
            bad = task.corrupt(ex, rng)
        except DataError:  # e.g. "... *0 mod 10": no single value matters; rare
            uncorruptible += 1
            continue
        assert bad.answer != ex.answer
        assert same(bad, task.parse_question(bad.question))  # steps, answer and values recomputed
        old, new = ex.question.split(" "), bad.question.split(" ")
        assert len(old) == len(new) and sum(a != b for a, b in zip(old, new)) == 1
    assert uncorruptible <= (0 if name == "mult" else 10)


def test_corrupt_fails_when_no_value_change_alters_the_answer():
    task = get_task("modchain", operators="*")
    with pytest.raises(DataError, match="no change of one value"):
        task.corrupt(task.parse_question("0 *0 mod 10"), random.Random(0))


# --- gsm8k and prosqa -------------------------------------------------------------------------


@pytest.mark.parametrize("split, count", [("train", 6973), ("valid", 500)])
def test_gsm8k_lines_round_trip(reference_data, split, count):
    task = get_task("gsm8k")
    text = (reference_data / "gsm8k" / f"{split}.txt").read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    assert len(lines) == count
    for line in lines:
        ex = task.parse_line(line)
        assert task.format_line(ex) == line
        assert len(ex.values) == len(ex.steps)


def test_gsm8k_steps_and_values(reference_data):
    examples, _ = read_examples(reference_data / "gsm8k" / "valid.txt")
    first, second = examples[:2]
    assert first.steps == ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>")
    assert first.values == (2, 4, 3, 300) and first.answer == "300" and first.id == "valid:1"
    assert second.values == (3, 5.5, 10)
    assert sum(not ex.steps for ex in examples) == 6  # a few problems come without steps
    task = get_task("gsm8k")
    assert task.parse_line("q||<<19.00+1=20.00>> #### 20").values == (20,)
    # A result that is not a number is kept as written; its value is None (issue 10).
    assert task.parse_line("q||<<3+4=seven>> #### 7").values == (None,)
    with pytest.raises(ValueError, match="separated by single spaces"):
        task.parse_line("q||<<3+4=7>>  <<7*2=14>> #### 14")


def test_answers_match():
    gsm8k, mult = get_task("gsm8k"), get_task("mult")
    assert gsm8k.answers_match("300", "300.0") and gsm8k.answers_match(" 1,600", "1600")
    assert not gsm8k.answers_match("301", "300") and not gsm8k.answers_match("abc", "300")
    assert mult.answers_match("5 5 6 0", "5560") and not mult.answers_match("5 5 6 1", "5560")
    assert gsm8k.chance_accuracy() is None and get_task("modchain", modulus=7).chance_accuracy() == 1 / 7


def test_prosqa_steps_and_values(reference_data):
    examples, _ = read_examples(reference_data / "prosqa" / "valid.json")
    assert len(examples) == 300
    ex = examples[0]
    assert ex.steps == ("Tom is a terpus.", "Every terpus is a brimpus.", "Every brimpus is a lempus.")
    assert ex.values == ("terpus", "brimpus", "lempus") and ex.answer == "Tom is a lempus."
    assert ex.meta["target"] == 16 and ex.id == "valid:1"
    task = get_task("prosqa")
    for ex in examples:
        assert same(task.parse_line(task.format_line(ex)), ex)


# --- registry ---------------------------------------------------------------------------------


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown task 'mul'.*mult, modchain, gsm8k, prosqa"):
        get_task("mul")
    with pytest.raises(ConfigError, match="no option 'digits'"):
        get_task("mult", digits=3)
    with pytest.raises(ConfigError, match="option n must be an integer 1..9"):
        get_task("mult", n=10)
    for name in ("gsm8k", "prosqa"):
        with pytest.raises(RimLensError, match=f"task {name} has no generator"):
            get_task(name).generate(1, seed=0)
        with pytest.raises(RimLensError):
            get_task(name).corrupt(None, random.Random(0))
    assert set(TASK_NAMES) == {"mult", "modchain", "gsm8k", "prosqa"}


def test_infer_task():
    assert infer_task("1 2 * 3 4||x #### y").options == {"n": 2}
    assert infer_task("3 +4 mod 7||0 #### 0").options["modulus"] == 7
    assert infer_task("q||<<1+1=2>> #### 2").name == "gsm8k"
    assert infer_task("Is Tom a wumpus?||Tom is a wumpus. #### yes") is None
    assert infer_task("1 2 3 * 3 4 5||x #### y", "mult").options == {"n": 3}


def test_gsm8k_hub_loader_without_network(monkeypatch):
    rows = [
        {
            "question": "Natalia sold clips to 48 friends,\nthen half as many.",
            "answer": "She sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072",
        }
    ]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, name, split: rows if (path, name) == ("openai/gsm8k", "main") else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (ex,) = load_hub("test")
    assert ex.question == "Natalia sold clips to 48 friends, then half as many."
    assert ex.steps == ("<<48/2=24>>", "<<48+24=72>>") and ex.values == (24, 72)
    assert ex.answer == "1072" and ex.id == "hub-test:1"
