"""Greedy decoding with a KV cache, under the same role-based attention masks as training.

A prompt holding Coconut thoughts is prefilled by the thought passes (`coconut.prefill`): the
inputs at its thought positions are hidden states, which one ordinary pass cannot compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model import coconut
from rim_lens.model.layouts import Batch, Layout, Role, additive_mask, collate, visibility

# (model, batch, cache) -> (logits of the prompt [B, S, V], forward passes run)
Prefill = Callable[[PreTrainedModel, Batch, DynamicCache], tuple[torch.Tensor, int]]


def plain_prefill(model: PreTrainedModel, batch: Batch, cache: DynamicCache) -> tuple[torch.Tensor, int]:
    """The whole prompt in one forward pass."""
    return model(**batch.model_inputs(), past_key_values=cache, use_cache=True).logits, 1


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
    prefill: Prefill | None = None,
) -> Decoded:
    """Decode greedily from left-padded prompts until every row emits `eos_id`, with a KV cache.

    `prefill` runs the prompt (default: one pass, or Coconut's thought passes if it holds
    thoughts; pass `partial(coconut.prefill, intervene=...)` to edit thoughts). Decoding under an
    intervention on block states, on any hook backend, is `rim_lens.analysis.engine.decode`.
    """
    start = time.perf_counter()
    batch = collate(prompts, pad_id, sees_question, side="left")
    roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
    cache = DynamicCache()
    prefill = prefill or (coconut.prefill if coconut.has_thoughts(batch) else plain_prefill)
    logits, passes = prefill(model, batch, cache)
    step_times: list[float] = []
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
