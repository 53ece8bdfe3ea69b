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
from rim_lens.model.checkpoints import device_of
from rim_lens.model.layouts import Batch, Layout, Role, additive_mask, collate, visibility

# (model, batch, cache) -> (logits of the prompt's last position [B, 1, V], forward passes run)
Prefill = Callable[[PreTrainedModel, Batch, DynamicCache], tuple[torch.Tensor, int]]


def plain_prefill(model: PreTrainedModel, batch: Batch, cache: DynamicCache) -> tuple[torch.Tensor, int]:
    """The whole prompt in one forward pass. Only the last position's logits are kept: the full
    ones would be [batch, length, vocabulary], gigabytes for a pretrained vocabulary."""
    return model(**batch.model_inputs(), cache=cache, use_cache=True, logits_to_keep=1).logits, 1


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
    thoughts; pass `partial(coconut.prefill, intervene=...)` to edit thoughts). Every input is
    built on the model's device; only the chosen token ids come back to the host. Decoding under
    an intervention on block states, on any hook backend, is `rim_lens.analysis.engine.decode`.
    """
    start = time.perf_counter()
    device = device_of(model)
    host = collate(prompts, pad_id, sees_question, side="left")
    # Decided on the host: a device tensor's value would cost a sync (or not exist, on `meta`).
    prefill = prefill or (coconut.prefill if coconut.has_thoughts(host) else plain_prefill)
    batch = host.to(device)
    roles, blocks, positions = batch.roles, batch.blocks, batch.position_ids
    cache = DynamicCache()
    logits, passes = prefill(model, batch, cache)
    step_times: list[float] = []
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
