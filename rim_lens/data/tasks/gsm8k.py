"""GSM8K with calculator steps in the iCoT format: `question||<<16/2=8>> <<8+4=12>> #### 12`."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import replace

from rim_lens.data.causal import ANSWER, STEP, CausalModel, Variable
from rim_lens.data.examples import Example, Value
from rim_lens.data.tasks.base import Task
from rim_lens.errors import RimLensError, clip

_ANNOTATION = re.compile(r"<<.*?>>")
# The result is what follows the last "=", e.g. "8" in <<16/2=8>>, "3/4" in <<3/4=3/4>>.
_RESULT = re.compile(r"<<.*=([^=]*)>>")
_STEP = re.compile(r"<<([^<>]*)=([^<>=]*)>>")  # (expression, result) of a one-equation step
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_LITERAL = re.compile(r"\d+(?:\.\d*)?|\.\d+")  # an unsigned number inside an expression


def number(text: str) -> int | float | None:
    """`text` as a number (int when integral, e.g. "19.00" -> 19), or None if it is not one."""
    if not _NUMBER.fullmatch(text):
        return None
    if text.lstrip("-").isdigit():
        return int(text)  # exact for large integers, which float is not
    value = float(text)
    return int(value) if value.is_integer() else value


def step_value(step: str) -> int | float | None:
    """The number a calculator step `<<expr=result>>` computes (thousands commas ignored), or None."""
    match = _RESULT.fullmatch(step)
    return number(match[1].strip().replace(",", "")) if match else None


def step_result(step: str) -> str | None:
    """The corrected step if a calculator step `<<expr=result>>` computes another result than it
    writes (rounding to the written precision allowed), else None (also when it cannot be
    evaluated)."""
    match = _STEP.fullmatch(step)
    if match is None:
        return None
    written, value = match[2].strip().replace(",", ""), _evaluate(match[1])
    result = number(written)
    if value is None or result is None:
        return None
    decimals = len(written.partition(".")[2])
    if abs(value - result) <= 0.5 * 10**-decimals + 1e-9 * max(1.0, abs(result)):
        return None
    return f"<<{match[1]}={_written(value)}>>"


class Gsm8k(Task):
    """Grade-school maths word problems; steps are the `<<expr=value>>` calculator equations."""

    name = "gsm8k"

    @classmethod
    def options_from_line(cls, line: str) -> dict | None:
        return {} if "<<" in line else None

    def split_steps(self, text: str) -> list[str]:
        steps = _ANNOTATION.findall(text)
        if " ".join(steps) != text:
            raise ValueError("expected steps '<<expr=value>>' separated by single spaces")
        return steps

    def make_example(self, question: str, steps: Sequence[str], answer: str) -> Example:
        """Steps are kept as written; a step's value is its result as a number, or None when the
        result is not one (`<<3/4=3/4>>`, `<<5*3>>`): probes skip such values.

        A step whose expression evaluates must equal its result, to the precision the result is
        written in (`<<10/3=3.33>>` passes, `<<2+2=5>>` fails). The answer itself comes from the
        word problem, not from the steps (about 5% of GSM8K's answers are no step's result), so
        only its form is checked."""
        if number(answer.replace(",", "")) is None:
            raise ValueError(f"expected a number as the answer, got '{clip(answer)}'")
        for step in steps:
            computed = step_result(step)
            if computed is not None:
                raise ValueError(
                    f"expected '{clip(computed, 80)}' (the step's arithmetic), got '{clip(step, 80)}'"
                )
        return Example(question, tuple(steps), answer, tuple(map(step_value, steps)), self.name)

    def causal_model(self) -> Gsm8kModel:
        return Gsm8kModel(self)

    def answers_match(self, pred: str, gold: str) -> bool:
        """Equal ignoring whitespace and thousands commas, or equal as numbers ("300" = "300.0")."""
        pred, gold = ("".join(s.split()).replace(",", "") for s in (pred, gold))
        if pred == gold:
            return True
        pred_value, gold_value = number(pred), number(gold)
        return pred_value is not None and gold_value is not None and pred_value == gold_value


class Gsm8kModel(CausalModel[Gsm8k]):
    """A solution as its calculator steps compute it: each step's result (step1..stepT, where the
    result is a number) and the answer, which is the result of the last step that produces it.

    Setting step t's result re-evaluates the later steps: a later expression uses step t's result
    where it writes that number (a question constant that happens to equal it is taken for it
    too: the steps do not say where their numbers come from). Where an expression cannot be
    evaluated, or no step produces the answer, the counterfactual is undefined."""

    def values(self, ex: Example) -> dict[str, Value]:
        found = {f"{STEP}{t}": v for t, v in enumerate(ex.values, 1) if isinstance(v, int | float)}
        answer = number("".join(ex.answer.split()).replace(",", ""))
        return {**found, ANSWER: answer} if answer is not None else found

    def _answer(self, ex: Example, var: Variable, value: Value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if var.kind == ANSWER:
            return _written(value)
        results = list(ex.values)
        answer = self.values(ex)[ANSWER]
        producer = max((i for i, r in enumerate(results) if r == answer), default=None)
        if producer is None:
            return None
        new = {var.step - 1: value}  # step index -> its changed result
        for i in range(var.step, producer + 1):
            match = _STEP.fullmatch(ex.steps[i])
            changed = {results[j]: v for j, v in sorted(new.items()) if v != results[j]}
            expr = (
                _LITERAL.sub(lambda m, changed=changed: _substitute(m[0], changed), match[1])
                if match
                else None
            )
            result = _evaluate(expr) if expr is not None else None
            if result is None:
                return None
            if result != results[i]:
                new[i] = result
        return _written(new.get(producer, results[producer]))


def _substitute(literal: str, changed: dict) -> str:
    """`literal` replaced by the new result of the step whose old result it equals, if any."""
    value = number(literal)
    return f"({_written(changed[value])})" if value in changed else literal


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _evaluate(expr: str) -> int | float | None:
    """The value of a calculator expression (numbers, + - * / // % **, parentheses), or None."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError("not a calculator expression")

    try:
        value = walk(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if isinstance(value, complex) or not math.isfinite(value):
        return None
    return int(round(value)) if abs(value - round(value)) < 1e-9 else value


def _written(value: int | float) -> str:
    """A number as a GSM8K answer writes it: integers without a decimal point."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def load_hub(split: str) -> list[Example]:
    """GSM8K's `split` from the Hugging Face hub (openai/gsm8k, config main), in this task's form.

    The steps are the calculator annotations of each solution, the answer what follows "####"
    without commas. Needs the `datasets` package and network access (or its cache).
    """
    try:
        from datasets import load_dataset  # optional, and slow to import
    except ImportError:
        raise RimLensError(
            "loading GSM8K from the hub needs the datasets package: pip install 'rim-lens[hub]'"
        ) from None
    task, examples = Gsm8k(), []
    for i, row in enumerate(load_dataset("openai/gsm8k", "main", split=split), 1):
        solution, _, final = row["answer"].partition("####")
        # A few questions span lines; an iCoT line cannot.
        question = " ".join(row["question"].strip().splitlines())
        ex = task.make_example(question, _ANNOTATION.findall(solution), final.strip().replace(",", ""))
        examples.append(replace(ex, id=f"hub-{split}:{i}"))
    return examples
