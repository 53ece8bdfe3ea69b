"""n x n digit multiplication in the iCoT format.

Numbers are written least-significant digit first, digits separated by spaces. For B's digit i the
partial product P_i = A * b_i * 10^i is padded to n+1+i digits, as is the running sum
S_i = P_0 + ... + P_i. The steps are `P_0 + P_1 ( S_1 ) + ... + P_{n-1}` (the running sum follows
every partial product but the first and the last); the answer A*B is padded to 2n digits.
Every line of the iCoT multiplication files follows this rule.
"""

from __future__ import annotations

import itertools
import re

from rim_lens.data.causal import ANSWER, DERIVED, STEP, CausalModel, Variable
from rim_lens.data.examples import Example, Value
from rim_lens.data.tasks.base import SyntheticTask, int_option

_QUESTION = re.compile(r"(\d(?: \d)*) \* (\d(?: \d)*)")


def digits(x: int, width: int) -> str:
    """`x` least-significant digit first, zero-padded to `width` digits, space-separated."""
    return " ".join(reversed(str(x).zfill(width)))


class Mult(SyntheticTask):
    """Multiplication of two n-digit numbers (most significant digit nonzero). Option `n` (1-9)."""

    name = "mult"
    option_names = ("n",)
    step_separator = " + "
    key_multiplicity = 2

    def __init__(self, n: int = 4) -> None:
        self.n = int_option(self.name, "n", n, 1, 9)
        self.options = {"n": self.n}

    @classmethod
    def options_from_line(cls, line: str) -> dict | None:
        match = _QUESTION.fullmatch(line.partition("||")[0])
        return {"n": len(match[1].split())} if match else None

    def parse_question(self, question: str) -> Example:
        match = _QUESTION.fullmatch(question)
        operands = [match[1].split(), match[2].split()] if match else []
        if not operands or any(len(o) != self.n or o[-1] == "0" for o in operands):
            example = self._question(10 ** (self.n - 1), 10**self.n - 1)
            raise ValueError(
                f"expected two {self.n}-digit operands, least-significant digit first "
                f"and most-significant nonzero, like '{example}'"
            )
        a, b = (int("".join(reversed(o))) for o in operands)
        return self._example(a, b)

    def _example(self, a: int, b: int) -> Example:
        n, steps, sums, total = self.n, [], [], 0
        for i, b_i in enumerate(reversed(str(b))):
            partial = a * int(b_i) * 10**i
            total += partial
            sums.append(total)
            step = digits(partial, n + 1 + i)
            if 0 < i < n - 1:
                step += f" ( {digits(total, n + 1 + i)} )"
            steps.append(step)
        partials = tuple(a * int(b_i) * 10**i for i, b_i in enumerate(reversed(str(b))))
        return Example(self._question(a, b), tuple(steps), digits(a * b, 2 * n), partials, self.name)

    def derived_values(self, ex: Example) -> dict[str, tuple]:
        """The running sums S_t = P_0 + ... + P_t (the last one is the answer)."""
        return {"running_sum": tuple(itertools.accumulate(ex.values))}

    def causal_model(self) -> MultModel:
        return MultModel(self)

    def key(self, question: str) -> str:
        """The unordered operand pair: a x b and b x a are one problem (same steps' products, same answer)."""
        left, _, right = question.partition(" * ")
        return " * ".join(sorted((left, right)))

    def _question(self, a: int, b: int) -> str:
        return f"{digits(a, self.n)} * {digits(b, self.n)}"

    def _question_spaces(self) -> list[tuple[str, int]]:
        return [("", (9 * 10 ** (self.n - 1)) ** 2)]

    def _question_at(self, space: int, index: int) -> str:
        low = 10 ** (self.n - 1)
        a, b = divmod(index, 9 * low)
        return self._question(low + a, low + b)

    def _one_value_changes(self, question: str) -> list[str]:
        # One digit of one operand; the most significant digits (tokens n-1 and 2n) stay nonzero.
        tokens = question.split(" ")
        leading = {self.n - 1, 2 * self.n}
        return [
            " ".join(tokens[:i] + [d] + tokens[i + 1 :])
            for i, token in enumerate(tokens)
            if token != "*"
            for d in "0123456789"
            if d != token and not (d == "0" and i in leading)
        ]


class MultModel(CausalModel[Mult]):
    """A x B as chain-of-thought computes it: the partial products P_t = A * b_t * 10^(t-1) (the
    steps' values, step1..stepn), the running sums S_t = P_1 + ... + P_t for 1 < t < n
    (running_sum2, ...; S_1 is P_1 and S_n the answer), and the answer S_n."""

    task: Mult

    def values(self, ex: Example) -> dict[str, Value]:
        n = self.task.n
        sums = self.task.derived_values(ex)["running_sum"]
        return {
            **{f"{STEP}{t}": p for t, p in enumerate(ex.values, 1)},
            **{f"running_sum{t}": sums[t - 1] for t in range(2, n)},
            ANSWER: sums[-1],
        }

    def _answer(self, ex: Example, var: Variable, value: Value) -> str | None:
        partials = list(ex.values)
        if var.kind == STEP:
            partials[var.step - 1] = value
            total = sum(partials)
        elif var.kind == DERIVED:
            total = value + sum(partials[var.step :])
        else:
            total = value
        n = self.task.n
        if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total < 10 ** (2 * n):
            return None
        return digits(total, 2 * n)

    def variable(self, name: str) -> Variable:
        v = super().variable(name)
        labels = {STEP: f"P{v.step}, partial product {v.step}", DERIVED: f"S{v.step}, running sum {v.step}"}
        return Variable(v.name, v.kind, v.step, labels.get(v.kind, v.label))
