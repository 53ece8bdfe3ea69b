"""Modular arithmetic chains: `7 +5 *3 -2 mod 10||2 6 4 #### 4`.

A start value is followed by operations `<op><operand>`; each step is the running value after one
operation, and the answer is the final value. All values lie in [0, modulus).
"""

from __future__ import annotations

import operator
import re

from rim_lens.data.causal import ANSWER, STEP, CausalModel, Variable
from rim_lens.data.examples import Example, Value
from rim_lens.data.tasks.base import SyntheticTask, int_option
from rim_lens.errors import ConfigError, clip

_QUESTION = re.compile(r"(\d+)((?: [+*-]\d+)+) mod (\d+)")
_OPERATION = re.compile(r" ([+*-])(\d+)")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class ModChain(SyntheticTask):
    """Chains of `length` operations (or `min_length`..`max_length`, each length equally often).

    The length options shape generation only: any chain length is read, so one task reads files
    of mixed lengths. The modulus and the operators are checked.
    """

    name = "modchain"
    option_names = ("length", "min_length", "max_length", "modulus", "operators")

    def __init__(
        self,
        length: int | None = None,
        min_length: int | None = None,
        max_length: int | None = None,
        modulus: int = 10,
        operators: str = "+-*",
    ) -> None:
        if length is not None and (min_length, max_length) != (None, None):
            raise ConfigError("task modchain: give either length or min_length/max_length, not both")
        if (min_length is None) != (max_length is None):
            raise ConfigError("task modchain: give both min_length and max_length")
        if min_length is None:
            low = high = int_option(self.name, "length", 4 if length is None else length, 1)
            self.options = {"length": low}
        else:
            low = int_option(self.name, "min_length", min_length, 1)
            high = int_option(self.name, "max_length", max_length, low)
            self.options = {"min_length": low, "max_length": high}
        self.lengths = range(low, high + 1)
        self.modulus = int_option(self.name, "modulus", modulus, 2)
        if not (
            isinstance(operators, str)
            and operators
            and set(operators) <= set(_APPLY)
            and len(set(operators)) == len(operators)
        ):
            raise ConfigError(
                "task modchain: option operators must be distinct characters of '+-*', "
                f"got {clip(repr(operators))}"
            )
        self.operators = operators
        self.options.update(modulus=self.modulus, operators=operators)

    @classmethod
    def options_from_line(cls, line: str) -> dict | None:
        match = _QUESTION.fullmatch(line.partition("||")[0])
        return {"modulus": int(match[3])} if match else None

    def parse_question(self, question: str) -> Example:
        match = _QUESTION.fullmatch(question)
        operations = _OPERATION.findall(match[2]) if match else []
        numbers = [match[1], *(x for _, x in operations)] if match else []
        # Numbers must be canonical ("7", not "07") so that equal chains are equal strings.
        if (
            not match
            or match[3] != str(self.modulus)
            or any(op not in self.operators for op, _ in operations)
            or any(str(int(x)) != x or int(x) >= self.modulus for x in numbers)
        ):
            raise ValueError(
                f"expected a question like '7 +5 *3 -2 mod {self.modulus}' with values "
                f"in 0..{self.modulus - 1} and operators from '{self.operators}'"
            )
        start, operations = int(match[1]), [(op, int(x)) for op, x in operations]
        value, values = start, []
        for op, operand in operations:
            value = _APPLY[op](value, operand) % self.modulus
            values.append(value)
        return Example(question, tuple(map(str, values)), str(value), tuple(values), self.name)

    def operations(self, question: str) -> list[tuple[str, int]]:
        """The operations of a valid question, in order: [(operator, operand), ...]."""
        self.parse_question(question)  # checks it
        return [(op, int(x)) for op, x in _OPERATION.findall(_QUESTION.fullmatch(question)[2])]

    def causal_model(self) -> ModChainModel:
        return ModChainModel(self)

    def _question(self, start: int, operations: list[tuple[str, int]]) -> str:
        return " ".join([str(start), *(f"{op}{x}" for op, x in operations), "mod", str(self.modulus)])

    def chance_accuracy(self) -> float | None:
        return 1 / self.modulus

    def _question_spaces(self) -> list[tuple[str, int]]:
        m, k = self.modulus, len(self.operators)
        return [(f" of length {n}", m * (k * m) ** n) for n in self.lengths]

    def _question_at(self, space: int, index: int) -> str:
        index, start = divmod(index, self.modulus)
        operations = []
        for _ in range(self.lengths[space]):
            index, op = divmod(index, len(self.operators))
            index, operand = divmod(index, self.modulus)
            operations.append((self.operators[op], operand))
        return self._question(start, operations)

    def _one_value_changes(self, question: str) -> list[str]:
        # Token 0 is the start value; tokens 1..T are `<op><operand>`; then "mod" and the modulus.
        tokens = question.split(" ")
        variants = [" ".join([str(v), *tokens[1:]]) for v in range(self.modulus) if str(v) != tokens[0]]
        for i in range(1, len(tokens) - 2):
            op, operand = tokens[i][0], tokens[i][1:]
            variants += [
                " ".join(tokens[:i] + [f"{op}{v}"] + tokens[i + 1 :])
                for v in range(self.modulus)
                if str(v) != operand
            ]
        return variants


class ModChainModel(CausalModel[ModChain]):
    """A chain as chain-of-thought computes it: the running value after each operation but the
    last (step1..step{T-1}; after the last it is the answer) and the answer. Setting step t's value
    continues the chain from it with the base's own operations t+1..T."""

    task: ModChain

    def values(self, ex: Example) -> dict[str, Value]:
        return {**{f"{STEP}{t}": v for t, v in enumerate(ex.values[:-1], 1)}, ANSWER: ex.values[-1]}

    def _answer(self, ex: Example, var: Variable, value: Value) -> str | None:
        m = self.task.modulus
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < m:
            return None
        if var.kind == STEP:
            for op, operand in self.task.operations(ex.question)[var.step :]:
                value = _APPLY[op](value, operand) % m
        return str(value)
