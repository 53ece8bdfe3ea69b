"""The Task interface: one reasoning task's line format, answer check and (if synthetic) generator.

Examples are stored as iCoT lines, `question||steps #### answer`. A task knows how its steps are
separated, which per-step values they carry and, for synthetic tasks, how to compute the whole
example from the question alone.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import ClassVar

import psutil
from tqdm import tqdm

from rim_lens.data.causal import CausalModel
from rim_lens.data.examples import Example
from rim_lens.errors import ConfigError, DataError, RimLensError, clip, size_text


def split_line(line: str) -> tuple[str, str, str]:
    """Split an iCoT line `question||steps #### answer` into question, steps text and answer."""
    question, bar, rest = line.partition("||")
    steps, hashes, answer = rest.partition(" #### ")
    if not (question and bar and hashes and answer):
        raise ValueError("expected 'question||steps #### answer'")
    return question, steps, answer


def int_option(task: str, key: str, value: object, low: int, high: int | None = None) -> int:
    """`value` checked to be an int in [low, high]; ConfigError naming the option otherwise."""
    in_range = isinstance(value, int) and low <= value and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"task {task}: option {key} must be an integer {bounds}, got {clip(repr(value))}")
    return value


class Task:
    """A reasoning task. Subclasses set `name`, `option_names` and implement `make_example`."""

    name: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    step_separator: ClassVar[str] = " "

    def __init__(self) -> None:
        self.options: dict = {}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.options.items())})"

    @classmethod
    def options_from_line(cls, line: str) -> dict | None:
        """Options under which this task reads `line` (e.g. mult's n), or None if it is not ours."""
        return None

    def make_example(self, question: str, steps: Sequence[str], answer: str) -> Example:
        """An example with its per-step values; ValueError saying what was expected if invalid."""
        raise NotImplementedError

    def parse_line(self, line: str) -> Example:
        """The example on an iCoT line; ValueError saying what was expected if malformed."""
        question, steps, answer = split_line(line)
        return self.make_example(question, self.split_steps(steps), answer)

    def format_line(self, ex: Example) -> str:
        """The iCoT line of `ex`; the exact inverse of `parse_line`."""
        return f"{ex.question}||{self.join_steps(ex.steps)} #### {ex.answer}"

    def split_steps(self, text: str) -> list[str]:
        """The steps in the steps part of a line."""
        return text.split(self.step_separator) if text else []

    def join_steps(self, steps: Sequence[str]) -> str:
        """The steps part of a line."""
        return self.step_separator.join(steps)

    def generate(
        self,
        n: int,
        seed: int,
        exclude: Collection[str] = (),
        one_per_key: bool = False,
        progress: bool = False,
    ) -> list[Example]:
        """`n` examples with distinct questions whose keys are not in `exclude`, the same for the
        same seed; with `one_per_key`, no two share a key."""
        raise RimLensError(f"task {self.name} has no generator; give a data file")

    def parse_question(self, question: str) -> Example:
        """The full example (steps, answer, values) for a question."""
        raise RimLensError(f"task {self.name} cannot compute an example from its question alone")

    def corrupt(self, ex: Example, rng: random.Random) -> Example:
        """`ex` with one operand or value of its question changed so that the answer differs.

        DataError if no such change exists (e.g. a chain ending in "*0").
        """
        raise RimLensError(f"task {self.name} cannot corrupt questions (only synthetic tasks can)")

    def derived_values(self, ex: Example) -> dict[str, tuple]:
        """Per-step quantities derived from the steps' own values (`ex.values`), by name, e.g.
        multiplication's running sums. Probes report them under these names, apart from the
        values the steps write."""
        return {}

    def causal_model(self) -> CausalModel:
        """The high-level causal model of the task's reasoning (`rim_lens.data.causal`): its
        variables and the answer under an interchange of one of them."""
        raise RimLensError(
            f"task {self.name} has no causal model of its reasoning (mult, modchain and gsm8k have one)"
        )

    def key(self, question: str) -> str:
        """The question's canonical key: questions with one key are one problem (e.g. a x b and
        b x a), so splits keep them on one side. By default, the question with its whitespace
        normalised."""
        return " ".join(question.split())

    def answers_match(self, pred: str, gold: str) -> bool:
        """Whether a predicted answer equals the gold one, ignoring whitespace."""
        return "".join(pred.split()) == "".join(gold.split())

    def chance_accuracy(self) -> float | None:
        """Accuracy of guessing answers uniformly, if the answer space is small enough to matter."""
        return None


class SyntheticTask(Task):
    """A task whose steps and answer follow from the question, so it can be generated and corrupted.

    Subclasses describe their question space: `_question_spaces` and `_question_at` enumerate it,
    `_one_value_changes` lists a question's minimal variants.
    """

    def _question_spaces(self) -> list[tuple[str, int]]:
        """(label, size) of each space of questions; generation draws from each equally often."""
        raise NotImplementedError

    def _question_at(self, space: int, index: int) -> str:
        """Question number `index` of space number `space`."""
        raise NotImplementedError

    def _one_value_changes(self, question: str) -> list[str]:
        """Every valid question that differs from `question` in exactly one operand or value."""
        raise NotImplementedError

    def make_example(self, question: str, steps: Sequence[str], answer: str) -> Example:
        ex = self.parse_question(question)
        if list(steps) != list(ex.steps):
            raise ValueError(
                f"expected steps '{clip(self.join_steps(ex.steps), 100)}' for question '{clip(question)}'"
            )
        if answer != ex.answer:
            raise ValueError(f"expected answer '{clip(ex.answer)}' for question '{clip(question)}'")
        return ex

    def question_space_size(self) -> int:
        """How many distinct questions the task has."""
        return sum(size for _, size in self._question_spaces())

    # At most how many questions share one canonical key (mult: a x b and b x a).
    key_multiplicity: ClassVar[int] = 1

    def generate(
        self,
        n: int,
        seed: int,
        exclude: Collection[str] = (),
        one_per_key: bool = False,
        progress: bool = False,
    ) -> list[Example]:
        """`n` examples with distinct questions whose keys are not in `exclude` (see `key`), the
        same for the same seed; with `one_per_key`, no two of them share a key. `progress` shows a
        progress bar on a terminal. DataError, before any work, if the task has fewer questions or
        the examples would not fit in memory."""
        self.check_count(n)
        rng = random.Random(seed)
        excluded = set(exclude)
        spaces = self._question_spaces()
        wanted = Counter(rng.randrange(len(spaces)) for _ in range(n))
        questions: list[str] = []
        for space, (label, size) in enumerate(spaces):
            if wanted[space]:
                questions += self._draw(rng, space, label, size, wanted[space], excluded, one_per_key)
        rng.shuffle(questions)
        bar = tqdm(questions, desc=f"generating {self!r}", unit=" ex", disable=None if progress else True)
        return [replace(self.parse_question(q), id=f"{self.name}-{seed}-{i}") for i, q in enumerate(bar)]

    def check_count(self, n: int) -> None:
        """DataError unless `n` distinct questions exist and their examples fit in the memory
        available now (estimated from a sample: `example_bytes`)."""
        size = self.question_space_size()
        if n > size:
            raise DataError(f"{self!r} has only {size:,} distinct questions; cannot generate {n:,}")
        per_example, _ = self.example_bytes()
        need, available = n * per_example, psutil.virtual_memory().available
        if need > available:
            raise DataError(
                f"{self!r}: {n:,} examples take about {size_text(need)} of memory to generate, more than "
                f"the {size_text(available)} available; generate at most {available // per_example:,}"
            )

    def example_bytes(self, sample: int = 16) -> tuple[int, int]:
        """About how many bytes of memory one generated example takes while a data set is made and
        written, and how long its iCoT line is: the mean over `sample` questions."""
        rng = random.Random(0)
        spaces = self._question_spaces()
        memory = line = 0
        for i in range(sample):
            space = i % len(spaces)
            ex = self.parse_question(self._question_at(space, rng.randrange(spaces[space][1])))
            text = len(self.format_line(ex).encode())
            # The example, and its line three times over: in a list, joined, encoded (write_examples).
            memory += _deep_size(ex) + 3 * text
            line += text + 1
        return memory // sample, line // sample

    def _draw(
        self,
        rng: random.Random,
        space: int,
        label: str,
        size: int,
        count: int,
        excluded: set[str],
        one_per_key: bool,
    ) -> list[str]:
        """`count` distinct questions of one space, none with a key in `excluded` (which, with
        `one_per_key`, grows by the key of every question picked)."""
        # An excluded key rejects at most `key_multiplicity` questions, and so does a picked one:
        # among that many distinct draws at least `count` are accepted, so one pass suffices; if
        # that is the whole space, the pass also counts what is available.
        draws = min(size, self.key_multiplicity * (count + len(excluded)))
        picked = []
        for index in _distinct_indices(rng, size, draws):
            question = self._question_at(space, index)
            key = self.key(question)
            if key not in excluded:
                picked.append(question)
                if one_per_key:
                    excluded.add(key)
                if len(picked) == count:
                    return picked
        excluded_note = f" ({size - len(picked)} of them excluded)" if len(picked) < size else ""
        raise DataError(
            f"{self!r} has only {size} distinct questions{label}{excluded_note}; cannot generate {count}"
        )

    def corrupt(self, ex: Example, rng: random.Random) -> Example:
        variants = [
            v for v in map(self.parse_question, self._one_value_changes(ex.question)) if v.answer != ex.answer
        ]
        if not variants:
            raise DataError(f"no change of one value alters the answer of '{clip(ex.question)}'")
        return replace(rng.choice(variants), id=f"{ex.id}:corrupt")


def _deep_size(obj: object) -> int:
    """Bytes of an object and of what it holds (strings, numbers, tuples, lists, dicts, dataclasses)."""
    size = sys.getsizeof(obj)
    if isinstance(obj, str | bytes | int | float | bool) or obj is None:
        return size
    if isinstance(obj, dict):
        return size + sum(_deep_size(k) + _deep_size(v) for k, v in obj.items())
    if isinstance(obj, tuple | list | set):
        return size + sum(_deep_size(v) for v in obj)
    return size + sum(_deep_size(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else size


def _distinct_indices(rng: random.Random, size: int, k: int) -> list[int]:
    """`k` distinct integers from range(size), in random order."""
    if size <= sys.maxsize:
        return rng.sample(range(size), k)
    # random.sample cannot take a range this long; in so large a space repeats are rare anyway.
    drawn: dict[int, None] = {}
    while len(drawn) < k:
        drawn[rng.randrange(size)] = None
    return list(drawn)
