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
_FACT = re.compile(r"(?:Every )?(\S+) is an? (\S+)\.")  # "Every A is a B." or "X is a Y."


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
        if asked is not None:
            _check_proof(question, asked, steps, said[2])
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


def _check_proof(question: str, asked: re.Match, steps: Sequence[str], answer: str) -> None:
    """ValueError unless the steps are facts the question states, each starting where the last
    ended (the first at X), and the answer is the one option those facts lead X to."""
    facts = _FACT.findall(question[: asked.start()])
    if not facts:
        return  # a question without its facts (a hand-made example): nothing to check against
    stated = {f"{'' if a == asked[1] else 'Every '}{a} is a {b}." for a, b in facts}
    at = asked[1]
    for step in steps:
        fact = _FACT.fullmatch(step)
        if fact is None or fact[1] != at or step.replace(" an ", " a ") not in stated:
            raise ValueError(
                f"expected a step the question states, from '{clip(at, 30)}', got '{clip(step)}'"
            )
        at = fact[2]
    reached, todo = {asked[1]}, [asked[1]]
    edges: dict[str, set[str]] = {}
    for a, b in facts:
        edges.setdefault(a, set()).add(b)
    while todo:
        for b in edges.get(todo.pop(), ()):
            if b not in reached:
                reached.add(b)
                todo.append(b)
    options = [o for o in (asked[2], asked[3]) if o in reached]
    if len(options) == 1 and answer != options[0]:
        raise ValueError(
            f"expected the answer '{clip(asked[1], 30)} is a {clip(options[0], 30)}.', "
            "the option the facts lead to"
        )
