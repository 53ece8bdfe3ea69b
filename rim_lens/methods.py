"""The training methods rim-lens compares, with what each one implies."""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    """How a model was trained. Values are the strings used in recipes, specs and run names."""

    DIRECT = "direct"  # the answer right after the question
    COT = "cot"  # the steps written out, then the answer
    PAUSE = "pause"  # memory blocks trained on the answer only: RiM without grounding
    RIM = "rim"  # memory blocks grounded on the steps (stage 1), then refined (stage 2)
    COCONUT = "coconut"  # continuous thoughts fed back as inputs, steps replaced stage by stage

    @property
    def uses_blocks(self) -> bool:
        """Whether inference appends memory blocks to the question."""
        return self in (Method.PAUSE, Method.RIM)

    @property
    def uses_thoughts(self) -> bool:
        """Whether inference feeds continuous thoughts (last hidden states) back as inputs."""
        return self is Method.COCONUT

    @property
    def writes_steps(self) -> bool:
        """Whether the model writes its reasoning steps before the answer."""
        return self is Method.COT

    @property
    def decodes_prefix(self) -> bool:
        """Whether the model writes the answer prefix itself (after its steps or thoughts), so the
        answer is what follows it; otherwise the prompt ends with the prefix."""
        return self in (Method.COT, Method.COCONUT)

    @property
    def grounded(self) -> bool:
        """Whether training supervises the blocks with the reasoning steps."""
        return self is Method.RIM

    @property
    def color(self) -> str:
        """The method's colour in every figure."""
        return _COLORS[self]


_COLORS = {
    Method.DIRECT: "#7f7f7f",
    Method.COT: "#1f77b4",
    Method.PAUSE: "#ff7f0e",
    Method.RIM: "#2ca02c",
    Method.COCONUT: "#9467bd",
}
METHODS: tuple[str, ...] = tuple(m.value for m in Method)
# What `make demo` trains: the comparison the paper's claim rests on. Coconut is opt-in there
# (`rim-lens demo --methods ...,coconut`; `make demo-full` trains it) to keep the demo within
# its 15-minute budget on two cores.
DEMO_METHODS: tuple[str, ...] = (Method.DIRECT, Method.COT, Method.PAUSE, Method.RIM)
