"""Loss weights over readouts: lambda for stage-1 steps, alpha for stage-2 blocks; and Coconut's
stage curriculum.

lambda_t(s): stage-1 progress s in [0, 1]. Every step weight is held at 1 for s < hold; then,
with u = (s - hold) / (1 - hold), step t of an example with T steps decays linearly from 1 to 0
over u in [(t-1)/T, t/T]: the earliest steps lose their supervision first, and each example is
scheduled by its own T. The answer readout keeps weight 1.

alpha_k: stage-2 weight of the answer read after block k of K; `linear` is proportional to k
(later blocks count more), `uniform` is flat; both sum to 1 over the K blocks.

Coconut stage s of S (c thoughts per step): stage 0 is CoT; stage s <= S replaces the first s
steps with s x c continuous thoughts (an example with fewer than s steps loses them all and
still gets s x c thoughts: the reference's `pad_latent_to_max`); stage S + 1 keeps S x c
thoughts and drops every remaining step, for chains longer than S (the paper's extra stage).
"""

from __future__ import annotations

import torch


def step_weights(t: torch.Tensor, T: torch.Tensor, progress: float, hold: float) -> torch.Tensor:
    """lambda for 1-based step indices `t` of examples with `T` steps (broadcastable)."""
    u = max(0.0, (progress - hold) / (1.0 - hold)) if hold < 1.0 else 0.0
    T = T.clamp_min(1).to(torch.float32)
    return (t.to(torch.float32) - u * T).clamp(0.0, 1.0)


def block_weights(k: torch.Tensor, K: int | torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """alpha for 1-based block indices `k` out of K (a number, or per row: [B, 1])."""
    k = k.to(torch.float32)
    if kind == "uniform":
        return torch.ones_like(k) / K
    return k / (K * (K + 1) / 2)


def grounding_weights(
    target_index: torch.Tensor, n_steps: torch.Tensor, progress: float, hold: float
) -> torch.Tensor:
    """Per-position stage-1 weights: lambda for step readouts, 1 for the answer, 0 elsewhere."""
    T = n_steps[:, None].expand_as(target_index)
    lam = step_weights(target_index, T, progress, hold)
    is_answer = target_index == T + 1
    return torch.where(is_answer, 1.0, lam) * (target_index > 0)


def refinement_weights(target_index: torch.Tensor, K: int | torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position stage-2 weights: alpha_k for the answer read after block k of K (per row:
    [B, 1], when examples have different K), 0 elsewhere."""
    return block_weights(target_index, K, kind) * (target_index > 0)


def coconut_stage(stage: int, c: int, stages: int) -> tuple[int, int | None]:
    """(continuous thoughts, steps replaced; None = all) in Coconut's stage `stage` of `stages`."""
    if not 0 <= stage <= stages + 1:
        raise ValueError(f"coconut stage {stage} out of range 0..{stages + 1}")
    if stage <= stages:
        return stage * c, stage
    return stages * c, None
