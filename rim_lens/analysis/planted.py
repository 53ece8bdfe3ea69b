"""Hand-built models whose memory blocks provably hold (or provably do not hold) the steps of n x n
multiplication: the planted positive and negative controls every finding of the report is
calibrated on (`calibration`).

A `PlantedLM` has the shape of a GPT-2 stack (`transformer.h`, `n_layer` layers of width `n_embd`)
over a run's own tokenizer and memory spec, so every hook backend's hf path, every analysis and the
report run on it unchanged. Its weights are SET from a seed, never trained:

- the embedding: token plus position embeddings;
- layer 0, the writer. Every block position gets the question: the sum, over the question
  positions it sees, of a per-position matrix times that position's state (what one attention
  layer's value path puts there; linear in the question). In the positive, every memory slot of
  block t also gets step t's value P_t = A * b_t * 10^(t-1), each of its 2n digits d as
  (cos, sin)(2 pi d / 10) along two code directions;
- the layers between pass the residual stream on;
- the last layer, the reader. The readout (the answer-prefix position) reads a stored step from the
  mean of block t's memory slots it sees through the attention mask (a knocked-out edge reads
  nothing), decoding each digit from its angle; a step the blocks do not store it computes from the
  question tokens it sees. The answer A = sum_t P_t is written least-significant digit first: at
  answer digit j the logit of digit e is KAPPA cos(2 pi ((S_j - R_j) / 10^j - e) / 10), S_j the sum
  of the steps' lowest j + 1 digits and R_j the digits already written. That is smooth in the
  block states, so DAS can learn through it, and a digit read slightly off still counts as its
  integer (`_digits`).

Everything else the model holds (embeddings, the question in the blocks) lies in the orthogonal
complement of the code directions, so a stored value is read exactly. The positive and its matched
negative (`planted`) differ in exactly one thing: whether the blocks store the steps (the negative's
readout computes every step from the question, as a pause model that ignores its blocks would).
Every decision has a margin of several nats, so outcomes are the same on every CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers import GPT2Config, PreTrainedTokenizerBase

from rim_lens.data.tasks import Task
from rim_lens.errors import RunError
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import memory_token_ids

KAPPA = 30.0  # the answer head's logit scale: the right digit leads the next one by 0.19 KAPPA
CODE_SCALE = 1.0  # the length of a digit's (cos, sin) code in the block state
MIX_SCALE = 0.5  # the size of each question position's share of the question in a block


@dataclass(frozen=True)
class Plan:
    """What a planted model computes: n x n multiplication (`n`), which steps (1-based) its blocks
    store (`stored`; the others its readout computes from the question), and the `seed` its
    weights are drawn from."""

    n: int
    stored: tuple[int, ...]
    seed: int = 0

    @property
    def digits(self) -> int:
        """Digits written per step value: P_t < 10^(2n)."""
        return 2 * self.n


def planted_config(
    tokenizer: PreTrainedTokenizerBase, spec: MemorySpec, task: Task, n_layer: int, n_embd: int, plan: Plan
) -> GPT2Config:
    """The config of a planted model over `tokenizer` and `spec` for `task` (multiplication only):
    `n_layer` layers of width `n_embd`. RunError (one line) if it cannot be built."""
    if task.name != "mult":
        raise RunError(
            f"planted controls are built for the mult task (the demo's); this run's task is {task.name}"
        )
    n = task.options["n"]
    if n != plan.n or not set(plan.stored) <= set(range(1, n + 1)):
        raise RunError(f"planted plan {plan} does not fit {n}x{n} multiplication")
    if n_layer < 2:
        raise RunError("a planted model needs 2 layers or more (a writer, then a reader of the blocks)")
    if spec.K < n:
        raise RunError(f"a planted model stores step t in block t: it needs K >= {n} blocks, got {spec.K}")
    if n_embd < 2 * plan.digits + 8:
        raise RunError(f"a planted model needs width >= {2 * plan.digits + 8}, got {n_embd}")
    digit_of = [-1] * len(tokenizer)
    for d, i in enumerate(tokenizer.convert_tokens_to_ids(list("0123456789"))):
        digit_of[i] = d
    begin, memory, end = memory_token_ids(tokenizer, spec)
    prefix = tokenizer.encode(spec.answer_prefix, add_special_tokens=False)
    if len(prefix) != 1:
        raise RunError("a planted model needs an answer prefix of one token")
    return GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=1,
        n_positions=512,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        planted={
            "n": n,
            "stored": list(plan.stored),
            "seed": plan.seed,
            "digit_of": digit_of,
            "begin": begin,
            "memory": memory,
            "end": end,
            "prefix": prefix[0],
            "question_length": 2 * n + 1,  # a_0 .. a_{n-1} * b_0 .. b_{n-1}
        },
    )


def _visible(
    mask: torch.Tensor | None, S: int, new: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which key each of the last `new` query positions sees ([B, new, S] bool, or None for
    plainly causal without padding) from an additive 4D mask, a 2D padding mask, or none."""
    causal = torch.ones(new, S, dtype=torch.bool, device=device).tril(S - new)
    if mask is None:
        return causal[None], None
    if mask.dim() == 4:
        return mask[:, 0] > torch.finfo(mask.dtype).min / 2, None
    keys = mask.bool()
    return causal[None] & keys[:, None, -S:], keys


class _Writer(nn.Module):
    """Layer 0: the question into every block position; in the positive, step t's digits into
    every memory slot of block t (see the module docstring)."""

    def __init__(self, config: GPT2Config, context: dict) -> None:
        super().__init__()
        p, d = config.planted, config.n_embd
        self.context = context
        self.mix = nn.Parameter(torch.randn(p["question_length"], d, d) / d**0.5)
        self.write = nn.Parameter(torch.randn(d, 4 * p["n"]) / d**0.5)

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self.context
        q_enc = torch.zeros_like(h)
        for r, where in enumerate(c["question_at"]):  # [B] position of question token r, -1: none
            rows = where >= 0
            state = h[torch.arange(len(h)), where.clamp_min(0)] * rows[:, None]
            sees = c["visible"][torch.arange(len(h)), :, where.clamp_min(0)] & rows[:, None]  # [B, S]
            q_enc = q_enc + sees[..., None] * (state @ self.mix[r])[:, None, :]
        h = h + c["in_block"][..., None] * q_enc
        stored = c["stored"]
        if stored:
            codes = _angles(c["steps"]) @ self.write.T  # [B, n, d]
            for t in stored:
                at = c["memory_of"] == t  # [B, S]
                h = h + at[..., None] * CODE_SCALE * codes[:, t - 1, None, :]
        return h


class _Pass(nn.Module):
    """A layer that passes the residual stream on."""

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return h


class _Reader(nn.Module):
    """The last layer: the readout's value of every step, read from the blocks it sees (stored
    steps) or computed from the question it sees (the others); their sum is the answer the head
    writes. Passes the residual stream on."""

    def __init__(self, config: GPT2Config, context: dict) -> None:
        super().__init__()
        self.context = context
        self.read = nn.Parameter(torch.randn(config.n_embd, 4 * config.planted["n"]) / config.n_embd**0.5)

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self.context
        rows = torch.arange(len(h))
        p0 = c["prefix_at"].clamp_min(0)
        sees = c["visible"][rows, p0] & (c["prefix_at"] >= 0)[:, None]  # [B, S] keys the readout sees
        sees_question = (sees & c["is_question"]).sum(1) == c["is_question"].sum(1)
        digits = []
        for t in range(1, c["n"] + 1):
            if t in c["stored"]:
                at = ((c["memory_of"] == t) & sees).float()  # [B, S]
                mean = (at[..., None] * h).sum(1) / at.sum(1, keepdim=True).clamp_min(1)
                digits.append(_digits(mean @ self.read))
            else:
                exact = _place_digits(c["steps"][:, t - 1], 2 * c["n"]).float()
                digits.append(exact * sees_question[:, None])
        c["digits"] = torch.stack(digits, 1)  # [B, steps, 2n]: every step's digits, as read
        return h


def _place_digits(values: torch.Tensor, digits: int) -> torch.Tensor:
    """The lowest `digits` decimal digits of integer values [...]: [..., digits], least significant first."""
    place = 10 ** torch.arange(digits, dtype=torch.long)
    return torch.div(values[..., None], place, rounding_mode="floor") % 10


def _angles(values: torch.Tensor) -> torch.Tensor:
    """Integer values [..., T] as the (cos, sin)(2 pi d / 10) of each of their 2 T digits,
    interleaved: [..., T, 4 T]."""
    angle = 2 * math.pi * _place_digits(values, 2 * values.shape[-1]).float() / 10
    return torch.stack([angle.cos(), angle.sin()], -1).flatten(-2)


def _digits(codes: torch.Tensor) -> torch.Tensor:
    """The digits a block's (cos, sin) codes [B, 2 * digits] spell, each read from its angle as a
    real number in [-0.5, 9.5) and pulled towards the nearest integer (twice x - sin(2 pi x) / 2 pi:
    flat at every integer, so a code read slightly off still spells its digit; smooth, so DAS can
    learn through it)."""
    angle = torch.atan2(codes[:, 1::2], codes[:, 0::2])
    digit = torch.remainder(angle * 10 / (2 * math.pi) + 0.5, 10) - 0.5
    for _ in range(2):
        digit = digit - torch.sin(2 * math.pi * digit) / (2 * math.pi)
    return digit


class PlantedLM(nn.Module):
    """A hand-built multiplication model (module docstring). Built from its config with random
    weights (the untrained copy: the analyses' random-init control); `planted` sets them."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        p = config.planted
        self.context: dict = {"n": p["n"], "stored": tuple(p["stored"])}
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.transformer = nn.Module()
        layers = [_Writer(config, self.context)]
        layers += [_Pass() for _ in range(config.n_layer - 2)]
        layers += [_Reader(config, self.context)]
        self.transformer.h = nn.ModuleList(layers)

    @classmethod
    def planted(cls, config: GPT2Config) -> PlantedLM:
        """The model with its weights set from `config.planted["seed"]`: codes written and read along
        the same orthonormal directions, everything else in their orthogonal complement."""
        model = cls(config)
        p, d = config.planted, config.n_embd
        gen = torch.Generator().manual_seed(int(p["seed"]))
        basis = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
        code, rest = basis[:, : 4 * p["n"]], basis[:, 4 * p["n"] :]
        keep = rest @ rest.T  # the projection onto the complement

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen)

        with torch.no_grad():
            model.wte.weight.copy_(draw(config.vocab_size, d) @ keep / d**0.5)
            model.wpe.weight.copy_(draw(config.n_positions, d) @ keep / d**0.5)
            writer, reader = model.transformer.h[0], model.transformer.h[-1]
            writer.mix.copy_(MIX_SCALE * draw(*writer.mix.shape) @ keep / d**0.5)
            writer.write.copy_(code)
            reader.read.copy_(code)
        return model.eval()

    # -- the forward pass ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **_,
    ) -> SimpleNamespace:
        new = input_ids.shape[1]
        ids, positions, visible = self._history(input_ids, position_ids, attention_mask, cache, use_cache)
        self._label(ids, visible)
        h = self.wte(ids) + self.wpe(positions.clamp(0, self.config.n_positions - 1))
        for layer in self.transformer.h:
            h = layer(h)
        logits = self._head(ids)[:, -new:]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def _history(
        self, ids, positions, mask, cache, use_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole sequence so far (a KV cache holds the earlier tokens here: the model recomputes
        every position) with its position ids and visibility [B, S, S]."""
        past = getattr(cache, "planted", None) if cache is not None else None
        if positions is None:
            start = 0 if past is None else past[1].shape[1]
            positions = torch.arange(start, start + ids.shape[1])[None].expand(len(ids), -1)
        if past is not None:
            ids, positions = torch.cat([past[0], ids], 1), torch.cat([past[1], positions], 1)
        S, new = ids.shape[1], ids.shape[1] - (0 if past is None else past[0].shape[1])
        rows, _ = _visible(mask, S, new, ids.device)
        rows = rows.expand(len(ids), -1, -1)
        if past is None:
            visible = rows
        else:
            visible = torch.zeros(len(ids), S, S, dtype=torch.bool)
            visible[:, : S - new, : S - new] = past[2]
            visible[:, S - new :] = rows
        if cache is not None and use_cache:
            cache.planted = (ids, positions, visible)
        return ids, positions, visible

    def _label(self, ids: torch.Tensor, visible: torch.Tensor) -> None:
        """What every position is (from the token ids): question token r, memory slot of block t,
        block position, the answer prefix; and each row's step values, computed from its question."""
        p, c = self.config.planted, self.context
        B, S = ids.shape
        at = torch.arange(S)[None].expand(B, -1)
        is_begin = ids == p["begin"]
        in_block = is_begin | (ids == p["memory"]) | (ids == p["end"])
        block = is_begin.long().cumsum(1)
        first_block = torch.where(is_begin.any(1), is_begin.long().argmax(1), torch.full((B,), S))
        bos = (ids == self.config.bos_token_id).long().argmax(1)
        is_question = (at > bos[:, None]) & (at < first_block[:, None])
        prefix = (ids == p["prefix"]) & (at > first_block[:, None])
        c.update(
            visible=visible,
            in_block=in_block,
            is_question=is_question,
            memory_of=torch.where(ids == p["memory"], block, 0),
            prefix_at=torch.where(prefix.any(1), prefix.long().argmax(1), -1),
            question_at=[
                torch.where(bos + 1 + r < first_block, bos + 1 + r, -1) for r in range(p["question_length"])
            ],
        )
        digit = torch.tensor(p["digit_of"])[ids].clamp_min(0)
        n = p["n"]

        def number(offset: int) -> torch.Tensor:  # n digits from question token `offset`, LSB first
            where = (bos[:, None] + 1 + offset + torch.arange(n)).clamp(max=S - 1)
            return (digit.gather(1, where) * 10 ** torch.arange(n)).sum(1)

        a = number(0)
        b_digits = [
            digit.gather(1, (bos + 2 + n + i).clamp(max=S - 1)[:, None])[:, 0] for i in range(n)
        ]  # b_i is question token n + 1 + i
        c["steps"] = torch.stack([a * b_digits[i] * 10**i for i in range(n)], 1)  # [B, n]

    def _head(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position: after the answer prefix, the answer's digits (least significant
        first) and then the end token; before it, nothing preferred."""
        p, c = self.config.planted, self.context
        B, S = ids.shape
        width = p["n"] * 2
        rel = torch.arange(S)[None] - c["prefix_at"][:, None]  # answer digit j is predicted at rel = j
        answering = (c["prefix_at"] >= 0)[:, None] & (rel >= 0)
        digit = torch.tensor(p["digit_of"])[ids].clamp_min(0).float()
        place = 10.0 ** (rel - 1).clamp(0, width - 1).float()
        written = torch.where((rel >= 1) & (rel <= width), digit * place, 0.0).cumsum(1)  # R_j at rel = j
        # Answer digit j of A = sum_t P_t needs the steps' digits 0..j only: the sum of
        # P_t mod 10^(j+1), minus the digits written, over 10^j, is d_j modulo 10. Higher digits
        # never enter, so an error in one cannot spill into a lower answer digit.
        low = (c["digits"].sum(1) * 10.0 ** torch.arange(width)).cumsum(1)  # [B, width]
        j = rel.clamp(0, width - 1)
        u = (low.gather(1, j) - written) / 10.0 ** j.float()
        e = torch.arange(10, dtype=torch.float32)
        digits = KAPPA * torch.cos(2 * math.pi * (u[..., None] - e) / 10)  # [B, S, 10]
        logits = torch.zeros(B, S, self.config.vocab_size)
        logits = torch.where(answering[..., None], torch.full_like(logits, -2 * KAPPA), logits)
        digit_ids = [i for i, d in sorted(enumerate(p["digit_of"]), key=lambda x: x[1]) if d >= 0]
        on_digit = (answering & (rel < width))[..., None]
        logits[..., digit_ids] = torch.where(on_digit, digits, logits[..., digit_ids])
        eos = self.config.eos_token_id
        logits[..., eos] = torch.where(answering & (rel >= width), KAPPA, logits[..., eos])
        return logits


def planted(
    tokenizer: PreTrainedTokenizerBase,
    spec: MemorySpec,
    task: Task,
    n_layer: int,
    n_embd: int,
    stored: Sequence[int] | None = None,
    seed: int = 0,
) -> PlantedLM:
    """A planted model over `tokenizer` and `spec` for `task`: the positive stores every step in its
    block (`stored` None), the matched negative none (`stored=()`); `stored=[1]` stores step 1 alone
    (the answer then comes from block 1 and the question)."""
    n = task.options.get("n", 0)
    plan = Plan(n, tuple(range(1, n + 1)) if stored is None else tuple(sorted(stored)), seed)
    return PlantedLM.planted(planted_config(tokenizer, spec, task, n_layer, n_embd, plan))
