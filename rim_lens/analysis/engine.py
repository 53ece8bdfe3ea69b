"""The one engine behind every causal analysis: many variants of the model per forward pass.

A `Variant` is a way to run the model: intact, with an intervention at some sites, and/or with
attention edges knocked out. `sweep` runs every (variant, example) pair, one batch row each, as
many rows per forward pass as fit, and returns a metric per pair. Ablation, knockout, patching
and interchange (`causal`) are specialisations of it, as is greedy decoding under a variant
(`decode`), which works on every backend.

Scores are teacher-forced: the prompt is followed by an answer and the end token, and a readout
counts as that answer when the argmax at every answer position is the answer's token, which is
exactly when greedy decoding emits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rim_lens.analysis.backends import Backend, Edit
from rim_lens.analysis.interventions import Intervention
from rim_lens.analysis.sites import Site, block_index
from rim_lens.data.examples import Example
from rim_lens.model.layouts import IGNORE, Batch, Layout, Role, SequenceBuilder, block_positions

# metric(logits, batch, example indices) -> one value (or vector) per row
Metric = Callable[[torch.Tensor, Batch, torch.Tensor], torch.Tensor]
KNOCKOUTS = ("answer->block", "block->earlier")


@dataclass(frozen=True)
class Knockout:
    """Attention edges removed in every layer: `answer->block` (the readout cannot see block
    `block`, None: any block) or `block->earlier` (block `block` cannot see earlier blocks);
    `slots` restricts the block tokens cut off (None: all)."""

    kind: str
    block: int | None = None
    slots: tuple[int, ...] | None = None

    def blocked(self, batch: Batch, row: int) -> torch.Tensor:
        """[S, S] the (query, key) pairs this knockout removes from one batch row."""
        roles, blocks, slots = batch.roles[row], batch.blocks[row], batch.slots[row]
        is_block = (roles >= Role.BLOCK_BEGIN) & (roles <= Role.BLOCK_END)
        if self.slots is not None:
            is_block = is_block & torch.isin(slots, torch.tensor(self.slots))
        if self.kind == "answer->block":
            queries = roles == Role.READOUT
            keys = is_block & ((blocks == self.block) if self.block is not None else True)
        else:
            queries = (roles >= Role.BLOCK_BEGIN) & (roles <= Role.BLOCK_END) & (blocks == self.block)
            keys = is_block & (blocks < self.block)
        return queries[:, None] & keys[None, :]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "block": self.block,
            "slots": None if self.slots is None else list(self.slots),
        }


@dataclass
class Variant:
    """One way to run the model: `intervention` at `sites` and/or a `knockout` (neither: intact)."""

    sites: list[Site] = field(default_factory=list)
    intervention: Intervention | None = None
    knockout: Knockout | None = None

    def edits(self, batch: Batch, rows: torch.Tensor, targets: torch.Tensor) -> list[Edit]:
        """The edits of this variant on batch rows `rows`, which hold the targets `targets`; sites
        in blocks the prompts do not have are skipped (a readout after fewer blocks)."""
        if self.intervention is None:
            return []
        pos = block_positions(batch)
        return [
            Edit(l, rows, pos[rows, block_index(k), j], _at(self.intervention, Site(l, k, j), targets))
            for l, k, j in self.sites
            if k <= pos.shape[1]
        ]


def _at(
    intervention: Intervention, site: Site, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit function of `intervention` at one site for rows holding `targets`."""
    return lambda base: intervention(base, site, targets)


def sweep(
    backend: Backend,
    builder: SequenceBuilder,
    seqs: Sequence[Layout],
    variants: Sequence[Variant],
    metric: Metric,
    max_rows: int = 256,
) -> torch.Tensor:
    """metric for every (variant, example): Tensor [n_variants, n_examples, ...]. Interventions
    must be fitted on `seqs`' examples (their rows are the example indices)."""
    n = len(seqs)
    pairs = [(v, e) for v in range(len(variants)) for e in range(n)]
    results = []
    for start in range(0, len(pairs), max_rows):
        chunk = torch.tensor(pairs[start : start + max_rows])
        var_idx, ex_idx = chunk[:, 0], chunk[:, 1]
        batch = builder.collate([seqs[e] for e in ex_idx.tolist()], side="left")
        knock_out(batch, [variants[v].knockout for v in var_idx.tolist()])
        edits = []
        for v in var_idx.unique().tolist():
            rows = (var_idx == v).nonzero()[:, 0]
            edits += variants[v].edits(batch, rows, ex_idx[rows])
        results.append(metric(backend.forward(batch, edits=edits).logits, batch, ex_idx))
    flat = torch.cat(results)
    return flat.view(len(variants), n, *flat.shape[1:])


def knock_out(batch: Batch, knockouts: Sequence[Knockout | None]) -> None:
    """Remove each row's knockout edges from the batch's attention mask, in place."""
    if not any(knockouts):
        return
    S = batch.roles.shape[1]
    blocked = torch.zeros(len(knockouts), S, S, dtype=torch.bool)
    for row, knockout in enumerate(knockouts):
        if knockout is not None:
            blocked[row] = knockout.blocked(batch, row)
    batch.attention_mask.masked_fill_(blocked[:, None], torch.finfo(batch.attention_mask.dtype).min)


# -- metrics ---------------------------------------------------------------------------------------
def answer_scores(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether greedy decoding reproduces the target tokens, and their total log-prob."""
    has = batch.targets != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0]
    correct = ((logits.argmax(-1) == batch.targets) | ~has).all(1)
    return correct, (logp * has).sum(1)


def correct_and_logprob(logits: torch.Tensor, batch: Batch, ex_idx: torch.Tensor) -> torch.Tensor:
    """The metric of teacher-forced scoring: [rows, 2] = (correct as 0/1, answer log-prob)."""
    correct, logprob = answer_scores(logits, batch)
    return torch.stack([correct.float(), logprob], -1)


def score(
    backend: Backend,
    builder: SequenceBuilder,
    examples: Sequence[Example],
    variants: Sequence[Variant],
    answers: Sequence[str] | None = None,
    max_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced scores of `answers` (default: the gold ones) under every variant:
    (correct [variants, examples] bool, answer log-prob [variants, examples])."""
    seqs = [builder.scored(ex, None if answers is None else answers[i]) for i, ex in enumerate(examples)]
    out = sweep(backend, builder, seqs, variants, correct_and_logprob, max_rows)
    return out[..., 0].bool(), out[..., 1]


# -- greedy decoding under a variant -----------------------------------------------------------------
@dataclass
class Decoded:
    """Greedy continuations: tokens per example (end of sequence excluded) and the log-prob of
    every token chosen (end of sequence included)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


@torch.no_grad()
def decode(
    backend: Backend,
    builder: SequenceBuilder,
    examples: Sequence[Example],
    variant: Variant | None = None,
    n_blocks: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> Decoded:
    """Greedy decoding of `examples` (read out after `n_blocks` blocks; default K) under
    `variant`, through the backend: each step runs the prompt and the tokens so far with the
    variant applied (no KV cache, so every backend decodes the same way)."""
    variant = variant or Variant()
    eos = builder.eos
    out = Decoded([], [])
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        targets = torch.arange(start, start + len(chunk))
        tokens: list[list[int]] = [[] for _ in chunk]
        logprobs: list[list[float]] = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        for _ in range(max_new_tokens):
            # Every row grows by one token a step, so left padding keeps the prompts in place.
            seqs = [builder.extend(builder.prompt(ex, n_blocks), ids) for ex, ids in zip(chunk, tokens)]
            batch = builder.collate(seqs, side="left")
            knock_out(batch, [variant.knockout] * len(chunk))
            rows = torch.arange(len(chunk))
            logits = backend.forward(batch, edits=variant.edits(batch, rows, targets)).logits[:, -1]
            logp = torch.log_softmax(logits.float(), -1)
            nxt = logits.argmax(-1)
            for row in (~done).nonzero().flatten().tolist():
                logprobs[row].append(float(logp[row, nxt[row]]))
                if nxt[row].item() != eos:
                    tokens[row].append(int(nxt[row]))
            done |= nxt == eos
            if bool(done.all()):
                break
            # Rows that are done keep a placeholder token so every row stays the same length.
            for row in done.nonzero().flatten().tolist():
                tokens[row].append(eos)
        out.tokens += [[t for t in ids if t != eos] for ids in tokens]
        out.logprobs += logprobs
    return out
