"""How much memory-block states depend on the input: the paper's PCA finding as one number.

The paper's PCA shows block states that barely depend on the question at initialisation, collapse
further when stage 1 grounds each block to its step, then spread out by input after stage 2. Per
layer, the variance of a block slot's state across questions (input variance) is compared with
the variance between the blocks' mean states (block variance):

    input share = input variance / (input variance + block variance)

near 0: every question gives each block the same state (blocks differ only by position); near 1:
the question dominates. The trainer measures it before training and after each stage
(metrics.json `input_share`); `rim-lens analyze pca` gives the per-block picture.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch
from transformers import PreTrainedModel

from rim_lens.model.checkpoints import device_of
from rim_lens.model.layouts import Layout, Role, collate

BLOCK_ROLES = (Role.BLOCK_BEGIN, Role.MEMORY, Role.BLOCK_END)


def block_states(
    model: PreTrainedModel, prompts: Seq[Layout], pad_id: int, sees_question: bool
) -> np.ndarray:
    """Hidden states at every block slot: [layers + 1, n, K, slots, d] (layer 0: embeddings).
    Every prompt must hold the same K blocks."""
    batch = collate(prompts, pad_id, sees_question).to(device_of(model))
    with torch.no_grad():
        hidden = model(**batch.model_inputs(), output_hidden_states=True, use_cache=False).hidden_states
    is_block = sum(batch.roles == r for r in BLOCK_ROLES).bool()
    n, K = len(prompts), int(batch.blocks[is_block].max())
    slots = int(is_block[0].sum()) // K
    # Row-major over (example, position): each row's block slots in order, block by block.
    # detach: with gradient checkpointing the embeddings' output is marked as requiring grad.
    states = torch.stack(hidden)[:, is_block].detach().float()  # [layers + 1, n * K * slots, d]
    return states.reshape(len(hidden), n, K, slots, -1).cpu().numpy().astype(np.float64)


def input_share(states: np.ndarray) -> list[float]:
    """Per layer, the input share of block-state variance (module docstring) from `block_states`
    [layers, n, K, slots, d], averaged over slots."""
    input_var = states.var(axis=1).sum(-1).mean(1)  # [layers, slots]: mean over blocks
    block_var = states.mean(1).var(axis=1).sum(-1)  # [layers, slots]
    total = input_var + block_var
    share = np.divide(input_var, total, out=np.zeros_like(total), where=total > 0)
    return share.mean(-1).tolist()


def measure(model: PreTrainedModel, prompts: Seq[Layout], pad_id: int, sees_question: bool) -> dict:
    """{"by_layer": input share per layer 1..L, "mean": their mean}: the embeddings (layer 0) are
    left out, as every memory token embeds the same way whatever the question."""
    was_training = model.training
    model.eval()
    try:
        by_layer = input_share(block_states(model, prompts, pad_id, sees_question))[1:]
    finally:
        model.train(was_training)
    return {"by_layer": by_layer, "mean": float(np.mean(by_layer))}
