"""An example: question, explicit reasoning steps, final answer and per-step values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# None: the step has no value a probe could decode (e.g. a GSM8K step whose result is "3/4").
Value = int | float | str | None


@dataclass(frozen=True)
class Example:
    """One reasoning problem: question, explicit steps, final answer and per-step values.

    `values[t]` is the quantity that `steps[t]` itself computes, as the step writes it (a partial
    product, a running value, an equation result, an entity reached); probes decode it from block
    states. Quantities derived from several steps (running sums, the answer) are not values: the
    task names them (`Task.derived_values`). A step whose result is not a value
    (e.g. GSM8K's `<<3/4=3/4>>`) has None, which probes skip.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    values: tuple[Value, ...]
    task: str
    id: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"], d["values"] = list(self.steps), list(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        return cls(
            question=d["question"],
            steps=tuple(d["steps"]),
            answer=d["answer"],
            values=tuple(d["values"]),
            task=d["task"],
            id=d.get("id", ""),
            meta=d.get("meta", {}),
        )
