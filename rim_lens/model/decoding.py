"""Greedy decoding with a KV cache, under the same role-based attention masks as training.

When every prompt is an ordinary causal sequence (RiM whose readout sees the question, direct,
CoT), decoding is the plain causal path of any LM: no mask at all when the batch has no padding,
else a 2D padding mask, and no custom 4D mask per step. Only a readout blind to the question needs
the role mask at every step. A prompt holding Coconut thoughts is prefilled by the thought passes
(`coconut.prefill`): the inputs at its thought positions are hidden states, which one ordinary
pass cannot compute.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model import coconut
from rim_lens.model.checkpoints import device_of
from rim_lens.model.layouts import Batch, Layout, Role, additive_mask, collate, visibility

# (model, batch, cache) -> (logits of the prompt's last position [B, 1, V], forward passes run)
Prefill = Callable[[PreTrainedModel, Batch, DynamicCache], tuple[torch.Tensor, int]]


def plain_prefill(model: PreTrainedModel, batch: Batch, cache: DynamicCache) -> tuple[torch.Tensor, int]:
    """The whole prompt in one forward pass, under its role mask. Only the last position's logits
    are kept: the full ones would be [batch, length, vocabulary], gigabytes for a pretrained
    vocabulary."""
    return model(**batch.model_inputs(), cache=cache, use_cache=True, logits_to_keep=1).logits, 1


@dataclass
class Decoded:
    """Generated tokens per prompt (end of sequence excluded), the model calls made, and the
    wall-clock time (s, from the start) at which each decoding step finished."""

    tokens: list[list[int]]
    forward_passes: int
    step_times: list[float]


def plain_causal(prompts: Seq[Layout], sees_question: bool) -> bool:
    """Whether every prompt is an ordinary causal sequence: each token sees exactly the tokens
    before it and positions count 0, 1, ... (decided once per layout: prompts repeat their shape)."""
    return all(_causal(tuple(p.roles), tuple(p.blocks), tuple(p.positions), sees_question) for p in prompts)


@functools.lru_cache(maxsize=4096)
def _causal(roles: tuple, blocks: tuple, positions: tuple, sees_question: bool) -> bool:
    S = len(roles)
    allowed = visibility(torch.tensor([roles]), torch.tensor([blocks]), sees_question)[0]
    return positions == tuple(range(S)) and bool((allowed == torch.ones(S, S, dtype=torch.bool).tril()).all())


def causal_inputs(prompts: Seq[Layout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids [B, S] and the padding mask (1 at tokens, 0 at padding) of plain
    causal prompts: all a causal LM needs, without the role mask `collate` builds."""
    S = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (S - len(p)) + p.ids for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _causal_prefill(
    model: PreTrainedModel, prompts: Seq[Layout], pad_id: int, device: torch.device, cache: DynamicCache
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain causal prompts in one forward pass: the last position's logits, the position ids and the
    padding mask (None without padding: then the model gets no mask at all)."""
    ids, mask = causal_inputs(prompts, pad_id)
    padded = not bool(mask.all())  # on the host, before the move: no device sync
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    inputs = (
        dict(input_ids=ids, attention_mask=mask, position_ids=positions) if padded else dict(input_ids=ids)
    )
    logits = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits, positions, mask if padded else None


def _append(tokens: list[list[int]], done: list[bool], chosen: list[int], eos_id: int) -> None:
    """Add each unfinished row's chosen token to its answer, or mark the row done at `eos_id`."""
    for row, token in enumerate(chosen):
        if not done[row]:
            if token == eos_id:
                done[row] = True
            else:
                tokens[row].append(token)


@torch.no_grad()
def greedy_decode(
    model: PreTrainedModel,
    prompts: Seq[Layout],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    sees_question: bool = True,
    prefill: Prefill | None = None,
    causal: bool | None = None,
) -> Decoded:
    """Decode greedily from left-padded prompts until every row emits `eos_id`, with a KV cache.

    `causal`: the plain causal path (default: whenever the prompts are plain causal sequences and
    hold no Coconut thoughts); False forces the role mask at every step. `prefill` runs the prompt
    on the role-masked path (default: one pass, or Coconut's thought passes if it holds thoughts;
    pass `partial(coconut.prefill, intervene=...)` to edit thoughts). Every input is built on
    the model's device; only the chosen token ids come back to the host. Decoding under an
    intervention on block states, on any hook backend, is `rim_lens.analysis.engine.decode`.
    """
    start = time.perf_counter()
    device = device_of(model)
    thoughts = any(Role.THOUGHT in p.roles for p in prompts)
    if causal is None:
        causal = prefill is None and not thoughts and plain_causal(prompts, sees_question)
    elif causal and (prefill is not None or thoughts):
        raise ValueError("the plain causal path runs a prompt in one pass: not with thoughts or a prefill")
    cache = DynamicCache()
    if causal:
        # No mask without padding, else a 2D padding mask that grows by one token per step.
        logits, positions, mask = _causal_prefill(model, prompts, pad_id, device, cache)
        passes = 1
    else:
        batch = collate(prompts, pad_id, sees_question, side="left").to(device)
        roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
        prefill = prefill or (coconut.prefill if thoughts else plain_prefill)
        logits, passes = prefill(model, batch, cache)
    step_times: list[float] = []
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        chosen = logits[:, -1].argmax(-1)
        step_times.append(time.perf_counter() - start)
        _append(tokens, done, chosen.tolist(), eos_id)
        if all(done) or len(step_times) == max_new_tokens:
            break
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        step = dict(input_ids=chosen.to(device)[:, None], cache=cache, use_cache=True)
        if not causal:
            # The new token is a readout of the last block the prompt holds.
            roles = torch.cat([roles, torch.full_like(roles[:, :1], Role.READOUT)], 1)
            blocks = torch.cat([blocks, blocks[:, -1:]], 1)
            mask = additive_mask(visibility(roles, blocks, sees_question)[:, -1:])
            step.update(position_ids=positions[:, -1:], attention_mask=mask)
        elif mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step.update(position_ids=positions[:, -1:], attention_mask=mask)
        logits = model(**step).logits
        passes += 1
    return Decoded(tokens, passes, step_times)
