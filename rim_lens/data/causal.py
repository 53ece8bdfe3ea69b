"""High-level causal models: the variables a task's reasoning computes and how the answer follows.

A causal model (Geiger et al., 2021) of a task names the intermediate variables that
chain-of-thought writes out and computes the answer from them. Its use is the *interchange
counterfactual*: the answer of a base example when one variable is set to its value on a source
example and everything else stays the base's. If swapping a subspace of a memory block's state
from the source into the base makes the model give that answer, the subspace carries the variable
(`rim_lens.analysis.abstraction`).

Variables are named the same way for every task:

    step{t}          the quantity step t writes (`Example.values[t - 1]`), t = 1..T
    {derived}{t}     a quantity derived from several steps (`Task.derived_values`), e.g. running_sum2
    answer           the final answer

Each task defines its model next to itself (`Task.causal_model()`): mult (partial products and
running sums), modchain (the running value), gsm8k (the calculator steps' results).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from rim_lens.data.examples import Example, Value

# The task a causal model describes (a `rim_lens.data.tasks.base.Task`, which imports this module).
T = TypeVar("T")

STEP, DERIVED, ANSWER = "step", "derived", "answer"
KINDS = (STEP, DERIVED, ANSWER)


@dataclass(frozen=True)
class Variable:
    """A variable of a causal model: its name, kind (step, derived or answer), the 1-based step
    that computes it (None for the answer) and a short label for tables and figures."""

    name: str
    kind: str
    step: int | None
    label: str = ""


def step_name(t: int) -> str:
    """The name of step t's variable (1-based): step1, step2, ..."""
    return f"{STEP}{t}"


class CausalModel(ABC, Generic[T]):
    """The causal model of one task. Subclasses (mult, modchain, gsm8k) define `values` and
    `_answer`."""

    def __init__(self, task: T) -> None:
        self.task = task

    @abstractmethod
    def values(self, ex: Example) -> dict[str, Value]:
        """Every variable's value on `ex`, by name; a variable `ex` does not have is absent."""

    def intervene(self, ex: Example, name: str, value: Value) -> str | None:
        """The answer of `ex`, written as the task writes answers, with variable `name` set to
        `value` and everything else as in `ex`; None where the model does not define it (`ex` has
        no such variable, or the answer cannot be written)."""
        return self._answer(ex, self.variable(name), value) if name in self.values(ex) else None

    @abstractmethod
    def _answer(self, ex: Example, var: Variable, value: Value) -> str | None:
        """`intervene` for a variable that `ex` has."""

    def variable(self, name: str) -> Variable:
        """The description of variable `name`."""
        if name == ANSWER:
            return Variable(ANSWER, ANSWER, None, "the answer")
        if name.startswith(STEP) and name[len(STEP) :].isdigit():
            t = int(name[len(STEP) :])
            return Variable(name, STEP, t, f"step {t}'s value")
        stem = name.rstrip("0123456789")
        t = int(name[len(stem) :])
        return Variable(name, DERIVED, t, f"{stem.replace('_', ' ')} after step {t}")

    def variables(self, examples: Sequence[Example]) -> list[Variable]:
        """The variables that some of `examples` have: steps in order, then derived ones, then the answer."""
        names = dict.fromkeys(name for ex in examples for name in self.values(ex))
        found = [self.variable(name) for name in names]
        return sorted(found, key=lambda v: (KINDS.index(v.kind), v.name.rstrip("0123456789"), v.step or 0))

    def counterfactual(self, base: Example, source: Example, name: str) -> str | None:
        """The answer of `base` with variable `name` taken from `source` (None if either lacks it)."""
        value = self.values(source).get(name)
        return None if value is None else self.intervene(base, name, value)
