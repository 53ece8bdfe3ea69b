"""GSM8K with calculator steps in the iCoT format: `question||<<16/2=8>> <<8+4=12>> #### 12`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from rim_lens.data.examples import Example
from rim_lens.data.tasks.base import Task
from rim_lens.errors import RimLensError, clip

_ANNOTATION = re.compile(r"<<.*?>>")
# The result is what follows the last "=", e.g. "8" in <<16/2=8>>, "3/4" in <<3/4=3/4>>.
_RESULT = re.compile(r"<<.*=([^=]*)>>")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


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
        result is not one (`<<3/4=3/4>>`, `<<5*3>>`): probes skip such values."""
        if number(answer.replace(",", "")) is None:
            raise ValueError(f"expected a number as the answer, got '{clip(answer)}'")
        return Example(question, tuple(steps), answer, tuple(map(step_value, steps)), self.name)

    def answers_match(self, pred: str, gold: str) -> bool:
        """Equal ignoring whitespace and thousands commas, or equal as numbers ("300" = "300.0")."""
        pred, gold = ("".join(s.split()).replace(",", "") for s in (pred, gold))
        if pred == gold:
            return True
        pred_value, gold_value = number(pred), number(gold)
        return pred_value is not None and gold_value is not None and pred_value == gold_value


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
