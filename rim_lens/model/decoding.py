"""Greedy decoding with a KV cache, under the same role-based attention masks as training."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model.layouts import Layout, Role, additive_mask, collate, visibility


@dataclass
class Decoded:
    """Generated tokens per prompt (end of sequence excluded), the model calls made, and the
    wall-clock time (s, from the start) at which each decoding step finished."""

    tokens: list[list[int]]
    forward_passes: int
    step_times: list[float]


@torch.no_grad()
def greedy_decode(
    model: PreTrainedModel,
    prompts: Seq[Layout],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    sees_question: bool = True,
) -> Decoded:
    """Decode greedily from left-padded prompts until every row emits `eos_id` (with a KV cache;
    decoding under an intervention, on any hook backend, is `rim_lens.analysis.engine.decode`)."""
    start = time.perf_counter()
    batch = collate(prompts, pad_id, sees_question, side="left")
    roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
    cache = DynamicCache()
    logits = model(**batch.model_inputs(), past_key_values=cache, use_cache=True).logits
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
        mask = additive_mask(visibility(roles, blocks, sees_question)[:, -1:])
        logits = model(
            input_ids=nxt[:, None],
            position_ids=positions[:, -1:],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        ).logits
        passes += 1
    return Decoded(tokens, passes, step_times)
