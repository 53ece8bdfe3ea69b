"""ProsQA (from Coconut): is X a Y or a Z, given a list of "Every A is a B." rules.

The steps are the sentences of the proof ("Tom is a terpus.", "Every terpus is a brimpus.", ...);
the value of a step is the entity it reaches ("brimpus"). Read from the ProsQA JSON list, or from
iCoT lines whose steps are the sentences joined by spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from rim_lens.data.examples import Example
from rim_lens.data.tasks.base import Task
from rim_lens.errors import clip

_SENTENCE_END = re.compile(r"(?<=\.) ")
_QUESTION = re.compile(r"Is (\S+) an? (\S+) or (?:an? )?(\S+)\?$")
_ANSWER = re.compile(r"(\S+) is an? (\S+)\.")


class ProsQA(Task):
    """Multi-hop reasoning over a graph of made-up concepts."""

    name = "prosqa"

    def split_steps(self, text: str) -> list[str]:
        return _SENTENCE_END.split(text) if text else []

    def make_example(self, question: str, steps: Sequence[str], answer: str) -> Example:
        """The example, checked: steps are sentences, and the answer `X is a Y.` names one of the
        question's two options (`Is X a Y or Z?`) and the concept the proof reaches."""
        values = []
        for step in steps:
            words = step.removesuffix(".").split()
            if not step.endswith(".") or not words:
                raise ValueError(f"expected step sentences ending in '.', got '{clip(step)}'")
            values.append(words[-1])
        said = _ANSWER.fullmatch(answer)
        asked = _QUESTION.search(question)
        if said is None:
            raise ValueError(f"expected an answer like 'Tom is a wumpus.', got '{clip(answer)}'")
        if asked is not None and (said[1], said[2]) not in {(asked[1], asked[2]), (asked[1], asked[3])}:
            x, y, z = (clip(asked[i], 30) for i in (1, 2, 3))
            raise ValueError(f"expected the answer '{x} is a {y}.' or '{x} is a {z}.'")
        if values and values[-1] != said[2]:
            raise ValueError(f"expected the answer to name '{clip(values[-1])}', where the proof ends")
        return Example(question, tuple(steps), answer, tuple(values), self.name)

    def from_record(self, record: object) -> Example:
        """The example of one ProsQA JSON record; its other fields (graph, target, ...) go to meta."""
        if not (
            isinstance(record, dict)
            and isinstance(record.get("question"), str)
            and isinstance(record.get("answer"), str)
            and isinstance(record.get("steps"), list)
            and all(isinstance(s, str) for s in record["steps"])
        ):
            raise ValueError("expected a record with strings question and answer and a list of steps")
        meta = {k: v for k, v in record.items() if k not in ("question", "steps", "answer")}
        return replace(self.make_example(record["question"], record["steps"], record["answer"]), meta=meta)
