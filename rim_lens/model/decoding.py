"""Greedy decoding with a KV cache, under the same role-based attention masks as training.

When every prompt is an ordinary causal sequence (RiM whose readout sees the question, direct,
CoT), decoding is the plain causal path of any LM: no mask at all when the batch has no padding,
else a 2D padding mask, and no custom 4D mask per step. Only a readout blind to the question needs
the role mask at every step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model.layouts import Batch, Layout, Role, additive_mask, collate, visibility


@dataclass
class Decoded:
    """Generated tokens per prompt (end of sequence excluded), the model calls made, and the
    wall-clock time (s, from the start) at which each decoding step finished."""

    tokens: list[list[int]]
    forward_passes: int
    step_times: list[float]


def plain_causal(batch: Batch) -> bool:
    """Whether every row of `batch` is an ordinary causal sequence: each token sees exactly the
    tokens before it (padding aside) and positions count 0, 1, ... from the first token."""
    real = batch.roles != Role.PAD
    allowed = batch.attention_mask[:, 0] == 0
    causal = torch.ones_like(allowed[0]).tril() & real[:, None, :] & real[:, :, None]
    counts = real.cumsum(1) - 1
    return bool((allowed[real] == causal[real]).all() and (batch.position_ids[real] == counts[real]).all())


@torch.no_grad()
def greedy_decode(
    model: PreTrainedModel,
    prompts: Seq[Layout],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    sees_question: bool = True,
    causal: bool | None = None,
) -> Decoded:
    """Decode greedily from left-padded prompts until every row emits `eos_id` (with a KV cache;
    decoding under an intervention, on any hook backend, is `rim_lens.analysis.engine.decode`).
    `causal`: the plain causal path (default: whenever the prompts are plain causal sequences);
    False forces the role mask at every step."""
    start = time.perf_counter()
    batch = collate(prompts, pad_id, sees_question, side="left")
    roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
    causal = plain_causal(batch) if causal is None else causal
    padding = (roles == Role.PAD).long()
    # Plain causal: no mask without padding, else a 2D padding mask that grows by one per step.
    padded = causal and bool(padding.any())
    inputs = batch.model_inputs()
    if causal:
        inputs = dict(input_ids=batch.input_ids)
        if padded:
            inputs.update(attention_mask=1 - padding, position_ids=positions)
    cache = DynamicCache()
    logits = model(**inputs, past_key_values=cache, use_cache=True).logits
    passes, step_times = 1, []
    tokens: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        step_times.append(time.perf_counter() - start)
        for row in (~done).nonzero().flatten().tolist():
            if nxt[row].item() != eos_id:
                tokens[row].append(nxt[row].item())
        done |= nxt == eos_id
        if bool(done.all()) or len(step_times) == max_new_tokens:
            break
        # The new token is a readout of the last block the prompt holds.
        roles = torch.cat([roles, torch.full_like(roles[:, :1], Role.READOUT)], 1)
        blocks = torch.cat([blocks, blocks[:, -1:]], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        padding = torch.cat([padding, padding[:, -1:] * 0], 1)
        step = dict(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        if not causal:
            step.update(
                position_ids=positions[:, -1:],
                attention_mask=additive_mask(visibility(roles, blocks, sees_question)[:, -1:]),
            )
        elif padded:
            step.update(position_ids=positions[:, -1:], attention_mask=1 - padding)
        logits = model(**step).logits
        passes += 1
    return Decoded(tokens, passes, step_times)
