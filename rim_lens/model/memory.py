"""The memory spec: which tokens form a block, how many, and how readouts are written.

It is saved as `rim_memory.json` beside every checkpoint this project writes, and every
analysis reads it from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rim_lens.errors import RunError
from rim_lens.methods import RIM, Method, get_method

SPEC_FILENAME = "rim_memory.json"
# Set by training from the recipe's top level (`thoughts`: from its `coconut` section), never in
# its `memory` section.
TRAINING_FIELDS = ("method", "task", "thoughts")


@dataclass(frozen=True)
class MemorySpec:
    """Memory-block format of a model.

    A block is `begin`, then M copies of `memory`, then `end`. Inference appends K blocks to
    the question, then `answer_prefix`, and decodes the answer. `method` records how the model
    was trained; direct, CoT and Coconut models have K = 0. A Coconut model instead appends
    `bot`, `thoughts` continuous thoughts (`thought` marks their positions; their inputs are
    hidden states, see `rim_lens.model.coconut`) and `eot`, then writes the answer prefix and
    the answer. A recipe's `memory` section holds every field but `method`, `task` and
    `thoughts` (set from the recipe's `coconut` section: c x stages).
    """

    # The metadata are the recipe's checks of the `memory` section (see training/config.py). A
    # "word" token is added to the tokenizer as one special token (no whitespace); the answer
    # prefix is written as text (spaces allowed). None may be blank, and all must differ.
    method: str = RIM.name
    begin: str = field(default="<b>", metadata={"token": "word"})
    memory: str = field(default="<m>", metadata={"token": "word"})
    end: str = field(default="</b>", metadata={"token": "word"})
    M: int = field(default=2, metadata={"min": 0})
    K: int = field(default=8, metadata={"min": 1})
    answer_prefix: str = field(default="####", metadata={"token": "text"})
    readout_sees_question: bool = True
    step_offset: int = field(default=0, metadata={"min": 0})
    task: str = ""
    bot: str = field(default="<bot>", metadata={"token": "word"})
    thought: str = field(default="<thought>", metadata={"token": "word"})
    eot: str = field(default="<eot>", metadata={"token": "word"})
    thoughts: int = 0

    def __post_init__(self) -> None:
        try:
            get_method(self.method)
        except RunError as err:
            raise RunError(f"memory spec: {err}") from None
        if self.M < 0 or self.K < 0 or self.step_offset < 0 or self.thoughts < 0:
            raise RunError("memory spec: M, K, step_offset and thoughts must be >= 0")

    @property
    def trained_by(self) -> Method:
        """The method object the model was trained with (`rim_lens.methods`)."""
        return get_method(self.method)

    @property
    def uses_blocks(self) -> bool:
        return self.trained_by.uses_blocks

    @property
    def uses_thoughts(self) -> bool:
        return self.trained_by.uses_thoughts

    @property
    def latent_blocks(self) -> int:
        """The latent blocks analyses address (labelled 1..n): RiM's and pause's K memory blocks, or
        a Coconut model's continuous thoughts (thought k is block k); 0 for direct and CoT."""
        return self.K if self.uses_blocks else self.thoughts if self.uses_thoughts else 0

    @property
    def block_slots(self) -> int:
        """Positions per latent block: begin, M memory tokens and end; a Coconut thought has one."""
        return 1 if self.uses_thoughts else self.M + 2

    @property
    def special_tokens(self) -> list[str]:
        """The method's three added tokens: (bot, thought, eot) for Coconut, else (begin, memory, end)."""
        if self.uses_thoughts:
            return [self.bot, self.thought, self.eot]
        return [self.begin, self.memory, self.end]

    def block_tokens(self) -> list[str]:
        return [self.begin] + [self.memory] * self.M + [self.end]

    def replace(self, **changes) -> MemorySpec:
        return dataclasses.replace(self, **changes)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / SPEC_FILENAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> MemorySpec:
        path = Path(directory) / SPEC_FILENAME
        if not path.exists():
            raise RunError(f"{directory}: no memory spec ({SPEC_FILENAME}); not a rim-lens checkpoint")
        try:
            fields = json.loads(path.read_text())
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as err:
            raise RunError(f"{path}: unreadable memory spec ({err})") from None
