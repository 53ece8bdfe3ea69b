"""Greedy decoding with a KV cache, under the same role-based attention masks as training."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model.checkpoints import device_of
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
    prefill_context: AbstractContextManager | None = None,
) -> Decoded:
    """Decode greedily from left-padded prompts until every row emits `eos_id`.

    Every input is built on the model's device; only the chosen token ids come back to the host.
    `prefill_context` wraps only the prompt's forward pass: interventions on block states
    (e.g. `HFBackend.editing`) live there, and the cache carries them into decoding.
    """
    start = time.perf_counter()
    device = device_of(model)
    batch = collate(prompts, pad_id, sees_question, side="left").to(device)
    roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
    cache = DynamicCache()
    with prefill_context or nullcontext():
        # Only the last position's logits are needed: the prompt's full logits would be
        # [batch, length, vocabulary], gigabytes for a pretrained vocabulary.
        logits = model(**batch.model_inputs(), cache=cache, use_cache=True, logits_to_keep=1).logits
    passes, step_times = 1, []
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        chosen = logits[:, -1].argmax(-1)
        step_times.append(time.perf_counter() - start)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                if token == eos_id:
                    done[row] = True
                else:
                    tokens[row].append(token)
        if all(done) or len(step_times) == max_new_tokens:
            break
        # The new token is a readout of the last block the prompt holds.
        roles = torch.cat([roles, torch.full_like(roles[:, :1], Role.READOUT)], 1)
        blocks = torch.cat([blocks, blocks[:, -1:]], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        mask = additive_mask(visibility(roles, blocks, sees_question)[:, -1:])
        logits = model(
            input_ids=chosen.to(device)[:, None],
            position_ids=positions[:, -1:],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        ).logits
        passes += 1
    return Decoded(tokens, passes, step_times)
