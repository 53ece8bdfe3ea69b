"""Token layouts for every method, with role / block / slot labels and 4D attention masks.

A RiM training example is packed as `[q][block_1]..[block_N][readout_1]..[readout_N]` and run
in ONE forward pass. Explicit position ids and a 4D mask make readout t see exactly what it
would see in the plain causal sequence `[q][block_1..block_t][readout_t]`:

- question tokens: causal over the question;
- block k: the question and blocks 1..k (causal inside the block); never a readout;
- readout t: the question (if `readout_sees_question`), blocks up to the one it reads, and
  its own earlier tokens; never another readout. Its positions continue from its block's end.

Direct and CoT sequences use the same machinery with no blocks, which reduces to a causal mask.

A Coconut sequence is `[q] <bot> <thought> x n <eot> [remaining steps, answer prefix, answer]`:
thought k is labelled role THOUGHT, block k, slot 0 (`<bot>`: block 0, `<eot>`: block n), so its
mask is causal too and analyses address thoughts as (layer, block k, slot 0) like RiM's blocks.
The `<thought>` token is a placeholder: its input embedding is replaced by the previous
position's last hidden state (`rim_lens.model.coconut` runs those passes).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import IntEnum

import torch
from transformers import PreTrainedTokenizerBase

from rim_lens.data.examples import Example
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import memory_token_ids

IGNORE = -100


class Role(IntEnum):
    """What a token position is; blocks and slots label the block roles."""

    PAD = 0
    QUESTION = 1
    BLOCK_BEGIN = 2
    MEMORY = 3
    BLOCK_END = 4
    READOUT = 5
    BOT = 6  # Coconut: begin of thoughts
    THOUGHT = 7  # Coconut: a continuous thought (block = its index k, slot 0)
    EOT = 8  # Coconut: end of thoughts


@dataclass
class Layout:
    """One laid-out example. Per position: token, position id, role, block k (1-based; for a
    readout token, the block it reads), slot j inside the block (-1 outside), the next-token
    target predicted there and which readout target t (1-based) it belongs to (0: none)."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    target_index: list[int] = field(default_factory=list)
    n_steps: int = 0

    def add(self, token: int, position: int, role: Role, block: int = 0, slot: int = -1) -> int:
        self.ids.append(token)
        self.positions.append(position)
        self.roles.append(int(role))
        self.blocks.append(block)
        self.slots.append(slot)
        self.targets.append(IGNORE)
        self.target_index.append(0)
        return len(self.ids) - 1

    def __len__(self) -> int:
        return len(self.ids)


class SequenceBuilder:
    """Lays out examples as training sequences and inference prompts for one tokenizer/spec."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        spec: MemorySpec,
        join_steps: Callable[[Seq[str]], str] = " ".join,
    ) -> None:
        self.tokenizer, self.spec, self.join_steps = tokenizer, spec, join_steps
        self.method = spec.trained_by
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.prefix = self.encode(spec.answer_prefix)
        # (begin, memory, end) for blocks, (bot, thought, eot) for Coconut, looked up once.
        self._special_ids = (
            memory_token_ids(tokenizer, spec) if spec.uses_blocks or spec.uses_thoughts else ()
        )
        self.block_ids = self.block_of(spec.M) if spec.uses_blocks else []
        self.thought_ids = self._special_ids if spec.uses_thoughts else ()

    def block_of(self, M: int) -> list[int]:
        """The token ids of one block with M memory tokens."""
        begin, memory, end = self._special_ids
        return [begin] + [memory] * M + [end]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def answer_target(self, answer: str) -> list[int]:
        """Readout tokens for the answer: prefix, answer, end of sequence."""
        return self.prefix + self.encode(answer) + [self.eos]

    def step_target(self, step: str) -> list[int]:
        return self.encode(step) + [self.eos]

    # -- layouts -----------------------------------------------------------------------------
    def question(self, ex: Example) -> Layout:
        """A new layout holding the question (after BOS, if the tokenizer has one)."""
        seq = Layout()
        ids = ([self.bos] if self.bos is not None else []) + self.encode(ex.question)
        for i, tok in enumerate(ids):
            seq.add(tok, i, Role.QUESTION)
        return seq

    def add_blocks(self, seq: Layout, n_blocks: int, n_memory: int | None = None) -> list[int]:
        """Append blocks 1..n (of `n_memory` memory tokens, default spec.M); returns the sequence
        index of each block's end token."""
        block = self.block_ids if n_memory is None else self.block_of(n_memory)
        ends = []
        for k in range(1, n_blocks + 1):
            for j, tok in enumerate(block):
                role = Role.BLOCK_BEGIN if j == 0 else Role.BLOCK_END if j == len(block) - 1 else Role.MEMORY
                idx = seq.add(tok, seq.positions[-1] + 1, role, block=k, slot=j)
            ends.append(idx)
        return ends

    def add_thoughts(self, seq: Layout, n_thoughts: int) -> None:
        """Append `<bot>`, n thought placeholders (thought k: block k, slot 0) and `<eot>`."""
        bot, thought, eot = self.thought_ids
        seq.add(bot, seq.positions[-1] + 1, Role.BOT, block=0)
        for k in range(1, n_thoughts + 1):
            seq.add(thought, seq.positions[-1] + 1, Role.THOUGHT, block=k, slot=0)
        seq.add(eot, seq.positions[-1] + 1, Role.EOT, block=n_thoughts)

    def add_readout(self, seq: Layout, after: int, target: list[int], t: int, block: int) -> None:
        """Readout target t, predicted from sequence index `after` onwards, positions continuing."""
        seq.targets[after], seq.target_index[after] = target[0], t
        pos = seq.positions[after]
        for i, tok in enumerate(target[:-1]):
            idx = seq.add(tok, pos + 1 + i, Role.READOUT, block=block)
            seq.targets[idx], seq.target_index[idx] = target[i + 1], t

    def direct(self, ex: Example) -> Layout:
        seq = self.question(ex)
        self.add_readout(seq, len(seq) - 1, self.answer_target(ex.answer), 1, 0)
        return seq

    def cot(self, ex: Example) -> Layout:
        seq = self.question(ex)
        target = self.encode(self.join_steps(ex.steps)) + self.answer_target(ex.answer)
        self.add_readout(seq, len(seq) - 1, target, 1, 0)
        seq.n_steps = len(ex.steps)
        return seq

    def thoughts(self, ex: Example, n_thoughts: int, skip_steps: int | None) -> Layout:
        """Coconut: n continuous thoughts in place of the first `skip_steps` steps (None: all);
        the remaining steps, the answer prefix and the answer are the target, read after `<eot>`."""
        seq = self.question(ex)
        self.add_thoughts(seq, n_thoughts)
        remaining = () if skip_steps is None else ex.steps[skip_steps:]
        target = self.encode(self.join_steps(remaining)) + self.answer_target(ex.answer)
        self.add_readout(seq, len(seq) - 1, target, 1, block=n_thoughts)
        seq.n_steps = len(ex.steps)
        return seq

    def grounding(self, ex: Example) -> Layout:
        """Stage 1: targets (r_1..r_T, y), target t read out after block t + step_offset."""
        targets = [self.step_target(s) for s in ex.steps] + [self.answer_target(ex.answer)]
        return self._packed(ex, targets, offset=self.spec.step_offset, n_steps=len(ex.steps))

    def refinement(self, ex: Example, n_blocks: int | None = None, n_memory: int | None = None) -> Layout:
        """Stage 2 (and pause): the answer read out after every one of K blocks (`n_blocks`,
        default spec.K) of M memory tokens (`n_memory`, default spec.M)."""
        K = self.spec.K if n_blocks is None else n_blocks
        targets = [self.answer_target(ex.answer)] * K
        return self._packed(ex, targets, offset=0, n_steps=len(ex.steps), n_memory=n_memory)

    def _packed(
        self, ex: Example, targets: list[list[int]], offset: int, n_steps: int, n_memory: int | None = None
    ) -> Layout:
        seq = self.question(ex)
        ends = self.add_blocks(seq, len(targets) + offset, n_memory)
        for t, target in enumerate(targets, start=1):
            self.add_readout(seq, ends[t + offset - 1], target, t, block=t + offset)
        seq.n_steps = n_steps
        return seq

    def scored(self, ex: Example, answer: str | None = None, n_blocks: int | None = None) -> Layout:
        """Inference prompt followed by `answer` (default: the gold one) and end of sequence,
        teacher-forced: the targets score exactly what greedy decoding would have to emit
        (Coconut: the answer prefix first, as it writes the prefix itself)."""
        seq = self.prompt(ex, n_blocks)
        tokens = self.encode(ex.answer if answer is None else answer) + [self.eos]
        if self.spec.uses_thoughts:
            tokens = self.prefix + tokens
        self.add_readout(seq, len(seq) - 1, tokens, 1, block=seq.blocks[-1])
        return seq

    def prompt(self, ex: Example, n_blocks: int | None = None) -> Layout:
        """Inference prompt, as the model's method lays it out (`Method.prompt`): question, blocks,
        answer prefix (CoT: the question alone; Coconut: question, `<bot>`, n thoughts, `<eot>`)."""
        return self.method.prompt(self, ex, n_blocks)

    def extend(self, seq: Layout, tokens: Seq[int]) -> Layout:
        """`seq` followed by `tokens` as readout tokens of its last block (e.g. generated ones)."""
        for tok in tokens:
            seq.add(tok, seq.positions[-1] + 1, Role.READOUT, block=seq.blocks[-1])
        return seq

    def collate(self, seqs: Seq[Layout], side: str = "right") -> Batch:
        """`collate` with this tokenizer's padding and this spec's readout visibility."""
        return collate(seqs, self.tokenizer.pad_token_id, self.spec.readout_sees_question, side)


# -- batching ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Padded tensors for a list of sequences; `attention_mask` is additive [B, 1, S, S]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    roles: torch.Tensor
    blocks: torch.Tensor
    slots: torch.Tensor
    targets: torch.Tensor
    target_index: torch.Tensor
    n_steps: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return dict(
            input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.attention_mask
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def visibility(roles: torch.Tensor, blocks: torch.Tensor, sees_question: bool) -> torch.Tensor:
    """Boolean [B, S, S]: which key position each query position may attend, from the
    [B, S] role and block labels."""
    S = roles.shape[1]
    q_roles, q_blocks = roles[:, :, None], blocks[:, :, None]
    k_roles, k_blocks = roles[:, None, :], blocks[:, None, :]

    def is_block(r: torch.Tensor) -> torch.Tensor:
        # Coconut's <bot>, thoughts and <eot> follow the block rules: a latent position sees those
        # with a block index up to its own, so with blocks 0, 1..n, n the mask is plainly causal.
        return ((r >= Role.BLOCK_BEGIN) & (r <= Role.BLOCK_END)) | ((r >= Role.BOT) & (r <= Role.EOT))

    q_readout, k_readout = q_roles == Role.READOUT, k_roles == Role.READOUT
    see_question = (k_roles == Role.QUESTION) & (~q_readout | sees_question)
    see_block = is_block(k_roles) & (is_block(q_roles) | q_readout) & (k_blocks <= q_blocks)
    see_readout = k_readout & q_readout & (k_blocks == q_blocks)
    idx = torch.arange(S, device=roles.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    allowed = causal & (see_question | see_block | see_readout)
    # A padding query always attends to itself, so no softmax row is empty (NaN under SDPA);
    # what else it sees does not matter, since nothing reads padding outputs.
    pad_self = (q_roles == Role.PAD) & (idx[None, :, None] == idx[None, None, :])
    return allowed | pad_self


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Booleans [B, Sq, Sk] to the additive float mask [B, 1, Sq, Sk] transformers expects."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate(seqs: Seq[Layout], pad_id: int, sees_question: bool = True, side: str = "right") -> Batch:
    """Pad sequences to one length (`side`: right for training, left for generation)."""
    S = max(len(s) for s in seqs)

    def pad(values: list[int], fill: int) -> list[int]:
        gap = [fill] * (S - len(values))
        return values + gap if side == "right" else gap + values

    def tensor(attr: str, fill: int) -> torch.Tensor:
        return torch.tensor([pad(getattr(s, attr), fill) for s in seqs], dtype=torch.long)

    roles, blocks = tensor("roles", Role.PAD), tensor("blocks", 0)
    return Batch(
        input_ids=tensor("ids", pad_id),
        position_ids=tensor("positions", 0),
        attention_mask=additive_mask(visibility(roles, blocks, sees_question)),
        roles=roles,
        blocks=blocks,
        slots=tensor("slots", -1),
        targets=tensor("targets", IGNORE),
        target_index=tensor("target_index", 0),
        n_steps=torch.tensor([s.n_steps for s in seqs], dtype=torch.long),
    )


def block_positions(batch: Batch) -> torch.Tensor:
    """Sequence index of block k, slot j for every row: LongTensor [B, K, M + 2]; for Coconut
    prompts, of thought k: [B, n, 1]."""
    is_block = ((batch.roles >= Role.BLOCK_BEGIN) & (batch.roles <= Role.BLOCK_END)) | (
        batch.roles == Role.THOUGHT
    )
    counts = is_block.sum(1)
    if (counts != counts[0]).any():
        raise ValueError("rows hold different numbers of block tokens")
    B, n = batch.roles.shape[0], int(counts[0])
    K = int(batch.blocks[is_block].max()) if n else 0
    # Block tokens appear in (block, slot) order, so the k-th block token of a row is its index.
    idx = is_block.nonzero()[:, 1].view(B, n)
    return idx.view(B, K, n // K if K else 0)


def slot_names(spec: MemorySpec) -> list[str]:
    """Labels of the slots of a block: the begin token, m1..mM, the end token (Coconut: the
    thought's one slot)."""
    if spec.uses_thoughts:
        return [spec.thought]
    return [spec.begin] + [f"m{j}" for j in range(1, spec.M + 1)] + [spec.end]
