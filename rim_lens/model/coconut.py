"""Coconut's continuous thoughts (Hao et al. 2024, "Training Large Language Models to Reason in a
Continuous Latent Space"): the forward passes that feed hidden states back as inputs.

A Coconut sequence is `[q] <bot> <thought> x n <eot> [rest]` (see `layouts.SequenceBuilder.thoughts`
and `.prompt`). The `<thought>` tokens are placeholders. The input embedding at thought k's
position is the *continuous thought* k: the last hidden state (after the final norm, what the
LM head reads) of the position before it, i.e. of `<bot>` for k = 1 and of thought k - 1
otherwise. Thought k + 1 therefore exists only once thought k's position has been computed, so
the n thoughts take n + 1 sequential forward passes sharing one KV cache, as in the reference
implementation:

    pass 0      the question and <bot>                     -> thought 1
    pass k      thought k's position (1 <= k < n)          -> thought k + 1
    pass n      thought n's position, <eot> and the rest   -> logits of the rest

(n = 0: one ordinary pass.) Training backpropagates through the fed-back states and the cache;
inference continues from the cache with ordinary greedy decoding (`decoding.greedy_decode`
dispatches a prompt holding thoughts here).

## What an intervention on thought k means
Thought k is a latent state like a RiM memory block: analyses address it as block k, slot 0
(`layouts.block_positions`), and resid[l] at its position as layer l. But unlike a block, whose
inputs are fixed tokens, thought k + 1's input IS thought k's output state. An intervention on
thought k is therefore applied while the passes run, and everything downstream is recomputed
from the edited state: thought k + 1 is computed from the edited thought k, thought k + 2 from
that, and so on, then `<eot>` and the answer. The effect of patching thought k is its total
effect through the whole later chain, not a single-position edit with the later thoughts held
at their clean values (that variant can still be had by teacher-forcing `thoughts` into
`forward_with_thoughts`, which `tests/test_coconut.py` shows to differ).

Two hooks, both honoured by `thought_forward` (teacher-forced scoring, training) and `prefill`
(free decoding via `greedy_decode(..., prefill=partial(prefill, intervene=...))`):

- `intervene(k, thought) -> thought`: called with continuous thought k ([B, d_model], the
  vector about to be fed at thought k's position, k = 1..n) and returns what is fed instead.
  Zero, mean and resample ablations and patching from a donor (a clean run's `thoughts[:, k-1]`)
  are all of this form. For GPT-2 the fed vector is the input embedding, so resid[0] at the
  position is it plus the position embedding; for Llama resid[0] is the vector itself.
- `pass_context(k) -> context manager`: entered around pass k (k = 0..n). In pass k >= 1,
  thought k's position is index 0 of that pass's input, so layer-wise edits at thought k
  (e.g. `HFBackend.editing([Edit(layer, rows, positions=zeros, values)])`) go there, and they
  propagate the same way, since the edited pass produces thought k + 1.

Per-row thought counts may differ inside a batch (rows with fewer thoughts simply keep their
token at the column); `intervene` sees every row but only rows holding thought k use its value.

Edits addressed by prompt position (`backends.Edit`) do not apply to the passes as they are,
since every pass starts at index 0: the hf analysis backend (`backends.HFBackend`) moves an edit
at thought k to index 0 of pass k, then runs one pass with the resulting thoughts teacher-forced
(`thought_inputs`) and the same edits, whose states at every position equal those of the passes
(causality): that is how analyses capture and edit thoughts at any layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from rim_lens.model.layouts import Batch, Role

Intervene = Callable[[int, torch.Tensor], torch.Tensor]  # (k, thought k [B, d]) -> fed vector [B, d]
PassContext = Callable[[int], AbstractContextManager]  # pass index k (0..n) -> context around it


@dataclass
class ThoughtOutput:
    """Logits [B, S, V] of every position (in the input batch's frame), the continuous thoughts
    actually fed [B, n, d] (after any intervention; zeros where a row has fewer thoughts) and the
    number of forward passes run."""

    logits: torch.Tensor
    thoughts: torch.Tensor
    passes: int


def has_thoughts(batch: Batch) -> bool:
    """Whether any row holds a continuous thought (and so needs the sequential passes)."""
    return bool((batch.roles == Role.THOUGHT).any())


def _bot_columns(batch: Batch) -> torch.Tensor:
    is_bot = batch.roles == Role.BOT
    if not bool(is_bot.any(1).all()):
        raise ValueError("a Coconut batch needs <bot> in every row")
    return is_bot.int().argmax(1)


def align(batch: Batch) -> tuple[Batch, torch.Tensor]:
    """`batch` with each row shifted right so that every `<bot>` is in one column (then thought k
    is in one column too, and each pass covers the same columns in every row, as the
    reference's collator arranges), and each row's shift [B]. The attention mask moves with the
    tokens; new columns are padding."""
    bot = _bot_columns(batch)
    shift = bot.max() - bot
    if not bool(shift.any()):
        return batch, shift
    B, S = batch.roles.shape
    width = S + int(shift.max())
    rows, cols = torch.arange(B)[:, None], torch.arange(S)[None, :] + shift[:, None]

    def move(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((B, width), fill, dtype=t.dtype, device=t.device)
        out[rows, cols] = t
        return out

    roles = move(batch.roles, Role.PAD)
    old = batch.attention_mask
    mask = torch.full((B, 1, width, width), torch.finfo(old.dtype).min, dtype=old.dtype, device=old.device)
    mask[rows[:, :, None], 0, cols[:, :, None], cols[:, None, :]] = old[:, 0]
    diagonal = torch.arange(width)
    pad = roles == Role.PAD  # every padding query attends to itself (no empty softmax row)
    mask[:, 0, diagonal, diagonal] = torch.where(pad, 0.0, mask[:, 0, diagonal, diagonal])
    moved = Batch(
        input_ids=move(batch.input_ids, 0),  # any id: padding inputs are never read
        position_ids=move(batch.position_ids, 0),
        attention_mask=mask,
        roles=roles,
        blocks=move(batch.blocks, 0),
        slots=move(batch.slots, -1),
        targets=move(batch.targets, -100),
        target_index=move(batch.target_index, 0),
        n_steps=batch.n_steps,
    )
    return moved, shift


def thought_forward(
    model: PreTrainedModel,
    batch: Batch,
    *,
    cache: DynamicCache | None = None,
    intervene: Intervene | None = None,
    pass_context: PassContext | None = None,
) -> ThoughtOutput:
    """Run `batch` with its continuous thoughts fed back (n + 1 passes, one KV cache).

    Rows are aligned on `<bot>` internally and the logits returned in the batch's own frame.
    A `cache` passed in is filled for decoding to continue from; it needs the batch already
    aligned (left-padded prompts with equal thought counts), since the cache is in that frame.
    """
    aligned, shift = align(batch)
    if cache is not None and aligned is not batch:
        raise ValueError("decoding from a Coconut prefill needs the same number of thoughts in every prompt")
    cache = DynamicCache() if cache is None else cache
    is_thought = aligned.roles == Role.THOUGHT
    n = int(is_thought.sum(1).max())
    bot = int(_bot_columns(aligned)[0])
    S = aligned.roles.shape[1]
    embeds = model.get_input_embeddings()(aligned.input_ids)
    logits, thoughts, start = [], [], 0
    for k in range(n + 1):
        # Pass k ends right after thought k's position (the <bot> for k = 0): its last hidden
        # state is thought k + 1. The last pass runs to the end of the sequence.
        end = bot + k + 1 if k < n else S
        with pass_context(k) if pass_context else nullcontext():
            out = model(
                inputs_embeds=embeds[:, start:end],
                position_ids=aligned.position_ids[:, start:end],
                attention_mask=aligned.attention_mask[:, :, start:end, :end],
                cache=cache,
                use_cache=True,
                output_hidden_states=k < n,
            )
        logits.append(out.logits)
        if k < n:
            column = end
            state = out.hidden_states[-1][:, -1]
            if intervene is not None:
                state = intervene(k + 1, state).to(state.dtype)
            fill = is_thought[:, column, None]
            thoughts.append(torch.where(fill, state, 0.0))
            # Not in place: the embeddings of earlier passes are part of the autograd graph.
            fed = torch.where(fill, state, embeds[:, column])
            embeds = torch.cat([embeds[:, :column], fed[:, None], embeds[:, column + 1 :]], 1)
        start = end
    full = torch.cat(logits, 1)
    if bool(shift.any()):
        full = full[
            torch.arange(full.shape[0])[:, None], torch.arange(batch.roles.shape[1])[None] + shift[:, None]
        ]
    stacked = torch.stack(thoughts, 1) if thoughts else embeds.new_zeros(embeds.shape[0], 0, embeds.shape[-1])
    return ThoughtOutput(full, stacked, n + 1)


def prefill(
    model: PreTrainedModel,
    batch: Batch,
    cache: DynamicCache,
    *,
    intervene: Intervene | None = None,
    pass_context: PassContext | None = None,
) -> tuple[torch.Tensor, int]:
    """The prompt's passes for greedy decoding: (logits [B, S, V], forward passes); `cache` is
    left holding the whole prompt, continuous thoughts included."""
    out = thought_forward(model, batch, cache=cache, intervene=intervene, pass_context=pass_context)
    return out.logits, out.passes


def thought_inputs(model: PreTrainedModel, batch: Batch, thoughts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of ONE ordinary pass over `batch` with `thoughts` [B, n, d] teacher-forced at the
    thought positions (thought k in the k-th thought column of each row): input embeddings,
    position ids and the attention mask."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    is_thought = batch.roles == Role.THOUGHT
    index = (is_thought.cumsum(1) - 1).clamp(0, max(thoughts.shape[1] - 1, 0))
    fed = thoughts[torch.arange(len(index))[:, None], index] if thoughts.shape[1] else embeds
    embeds = torch.where(is_thought[..., None], fed.to(embeds.dtype), embeds)
    return dict(inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask)


def forward_with_thoughts(model: PreTrainedModel, batch: Batch, thoughts: torch.Tensor) -> torch.Tensor:
    """Logits of ONE ordinary pass with `thoughts` [B, n, d] teacher-forced (`thought_inputs`).
    With the thoughts of a clean `thought_forward` this reproduces its logits (causality); with
    one thought replaced it is the single-position edit whose effect does not reach the later
    thoughts."""
    return model(**thought_inputs(model, batch, thoughts), use_cache=False).logits
