"""Train, validation and test sets, disjoint by each task's canonical question key.

Settings are chosen on `val`; `test` is scored once, at the end. Two questions with one key (for
multiplication a x b and b x a) always land on the same side, so no test question has its twin
in training. Each split comes from a file or, given as a number, is generated (synthetic tasks) or
held out of the training file (the others). Held-out splits hold one question per key, so their
questions are independent draws and a Wilson interval over them is honest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from rim_lens.data.examples import Example
from rim_lens.data.tasks import SyntheticTask, Task
from rim_lens.errors import ConfigError

Source = int | str  # how many examples to make, or a data file
Reader = Callable[[str], list[Example]]


@dataclass
class Splits:
    """The three sets, and how many training examples were dropped because their key is held out."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    dropped_from_train: int = 0

    def coverage(self, task: Task) -> float | None:
        """The fraction of the task's question space that the training questions cover (synthetic
        tasks only: others have no enumerable space)."""
        size = task.question_space_size() if isinstance(task, SyntheticTask) else None
        return len({ex.question for ex in self.train}) / size if size else None

    def summary(self, task: Task) -> dict:
        """Sizes, dropped examples and coverage, as recorded in a run's metrics."""
        return {
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "dropped_from_train": self.dropped_from_train,
            "train_coverage": self.coverage(task),
        }


def keys(task: Task, examples: list[Example]) -> set[str]:
    return {task.key(ex.question) for ex in examples}


def make_splits(task: Task, train: Source, val: Source, test: Source, seed: int, read: Reader) -> Splits:
    """The three splits from their sources (see the module docstring); `read` loads a data file."""
    files = {
        name: read(src)
        for name, src in (("train", train), ("val", val), ("test", test))
        if isinstance(src, str)
    }
    pool = files.get("train")  # held-out splits given as numbers are carved out of a training file

    def held_out(name: str, source: Source, taken: set[str], offset: int) -> list[Example]:
        if isinstance(source, str):
            return files[name]
        if isinstance(task, SyntheticTask):
            return task.generate(source, seed=seed + offset, exclude=taken, one_per_key=True)
        if pool is None:
            raise ConfigError(
                f"data.{name}: task {task.name} cannot generate examples; give a file, or a number "
                "to hold out of data.train (a file)"
            )
        return _carve(task, pool, source, taken, random.Random(seed + offset), name)

    test_set = _ided(held_out("test", test, set(), 0), "test")
    val_set = _ided(held_out("val", val, keys(task, test_set), 1), "val")
    overlap = keys(task, test_set) & keys(task, val_set)
    if overlap:
        raise ConfigError(
            f"data.val and data.test share {len(overlap)} question(s), e.g. {sorted(overlap)[0]!r}; "
            "validation and test sets must be disjoint"
        )
    taken = keys(task, test_set) | keys(task, val_set)
    if isinstance(train, str):
        train_set = [ex for ex in files["train"] if task.key(ex.question) not in taken]
        dropped = len(files["train"]) - len(train_set)
    else:
        train_set, dropped = task.generate(train, seed=seed + 2, exclude=taken), 0
    for name, split in (("train", train_set), ("val", val_set), ("test", test_set)):
        if not split:
            raise ConfigError(f"data.{name}: the {name} set is empty")
    return Splits(train_set, val_set, test_set, dropped)


def _carve(
    task: Task, pool: list[Example], n: int, taken: set[str], rng: random.Random, name: str
) -> list[Example]:
    """`n` examples of `pool` with distinct keys, none in `taken` (which grows by theirs)."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked = []
    for i in order:
        key = task.key(pool[i].question)
        if key not in taken:
            taken.add(key)
            picked.append(pool[i])
            if len(picked) == n:
                return picked
    raise ConfigError(
        f"data.{name}: cannot hold out {n} examples with distinct questions; "
        f"the training file has {len(picked)} left"
    )


def _ided(examples: list[Example], split: str) -> list[Example]:
    """Examples without an id get one naming their split, so results trace back to a question."""
    return [ex if ex.id else replace(ex, id=f"{split}-{i}") for i, ex in enumerate(examples)]
