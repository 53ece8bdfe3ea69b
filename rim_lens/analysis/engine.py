"""The one engine behind every causal analysis: many variants of the model per forward pass.

A `Variant` is a way to run the model: intact, with an intervention at some sites, and/or with
attention edges knocked out. `sweep` runs every (variant, example) pair, one batch row each, as
many rows per forward pass as fit, and returns a metric per pair. Ablation, knockout, patching
and interchange (`causal`) are specialisations of it, as is greedy decoding under a variant
(`decode`), which works on every backend.

`resume_sweep` computes the same thing with less work (hf backend): a row whose earliest edit is
at layer l, position p equals the intact run below layer l and before position p, so it starts
from the intact run's resid[l] at positions p.. and reuses its keys and values for positions < p.
Exact patching uses it: a patch at a late layer or a late block costs a fraction of a pass.

A Coconut model's continuous thoughts are blocks too (thought k: block k, slot 0): `sweep` and
`decode` run them through the hf backend's thought passes, so an intervention on thought k also
changes every later thought (see `backends.HFBackend`); `resume_sweep` cannot, and refuses them.

Scores are teacher-forced: the prompt is followed by an answer and the end token, and a readout
counts as that answer when the argmax at every answer position is the answer's token, which is
exactly when greedy decoding emits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rim_lens.analysis.backends import Backend, Edit, HFBackend
from rim_lens.analysis.interventions import Intervention
from rim_lens.analysis.sites import Site, block_index
from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.model import coconut
from rim_lens.model.layouts import IGNORE, Batch, Layout, Role, SequenceBuilder, block_positions
from rim_lens.progress import progress

# metric(logits, batch, example indices) -> one value (or vector) per row
Metric = Callable[[torch.Tensor, Batch, torch.Tensor], torch.Tensor]
KNOCKOUTS = ("answer->block", "block->earlier")
# resume_sweep: a row joins a forward pass that starts earlier than it would only while that costs
# it at most this share of the positions it needs (fewer, fuller passes against wasted positions).
WASTE = 0.125
# sweep: the most logit values one pass may hold (512 MiB in fp32; the metric's log-softmax holds as
# many again). From-scratch vocabularies never reach it; SmolLM2's 49k vocabulary at 70 positions
# does at 39 rows (the report's knockout at 256 rows a pass peaked at 6.1 GB).
LOGITS_BUDGET = 1 << 27


@dataclass(frozen=True)
class Knockout:
    """Attention edges removed in every layer: `answer->block` (the readout cannot see block
    `block`, None: any block) or `block->earlier` (block `block` cannot see earlier blocks);
    `slots` restricts the block tokens cut off (None: all)."""

    kind: str
    block: int | None = None
    slots: tuple[int, ...] | None = None

    def blocked(self, batch: Batch, row: int) -> torch.Tensor:
        """[S, S] the (query, key) pairs this knockout removes from one batch row. A Coconut
        thought is a block; its `<eot>` reads the thoughts for the answer, so it counts as answer."""
        roles, blocks, slots = batch.roles[row], batch.blocks[row], batch.slots[row]
        in_block = ((roles >= Role.BLOCK_BEGIN) & (roles <= Role.BLOCK_END)) | (roles == Role.THOUGHT)
        is_block = in_block
        if self.slots is not None:
            is_block = is_block & torch.isin(slots, torch.tensor(self.slots))
        if self.kind == "answer->block":
            queries = (roles == Role.READOUT) | (roles == Role.EOT)
            keys = is_block & ((blocks == self.block) if self.block is not None else True)
        else:
            queries = in_block & (blocks == self.block)
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
        sites = [s for s in self.sites if s.block <= pos.shape[1]]
        if getattr(self.intervention, "joint", False):
            return [
                self._joint(pos, rows, targets, [s for s in sites if s.layer == l])
                for l in {s.layer for s in sites}
            ]
        return [
            Edit(l, rows, pos[rows, block_index(k), j], _at(self.intervention, Site(l, k, j), targets))
            for l, k, j in sites
        ]

    def _joint(self, pos: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, group: list[Site]) -> Edit:
        """One edit of a joint intervention (`subspaces.JointInterchange`) over a group of sites at
        one layer: it maps each row's states there, concatenated [rows, n * d_model], at once."""
        n = len(group)
        where = pos[rows][:, [block_index(s.block) for s in group], [s.slot for s in group]]  # [rows, n]
        joint = self.intervention

        def edit(base: torch.Tensor) -> torch.Tensor:
            return joint(base.reshape(len(rows), -1), tuple(group), targets).reshape(base.shape)

        return Edit(group[0].layer, rows.repeat_interleave(n), where.flatten(), edit)


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
    must be fitted on `seqs`' examples (their rows are the example indices). A pass takes at most
    `max_rows` rows, fewer when their logits would pass `LOGITS_BUDGET`."""
    n = len(seqs)
    pairs = [(v, e) for v in range(len(variants)) for e in range(n)]
    per_pass = rows_per_pass(backend, seqs, max_rows)
    results = []
    for start in progress(range(0, len(pairs), per_pass), desc="sweep", unit="pass", leave=False):
        chunk = torch.tensor(pairs[start : start + per_pass])
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


def rows_per_pass(backend: Backend, seqs: Sequence[Layout], max_rows: int) -> int:
    """How many of `seqs` one pass may take: `max_rows`, or fewer if their full-vocabulary logits
    would hold more than `LOGITS_BUDGET` values (a pretrained vocabulary: 49k per position)."""
    per_row = max(map(len, seqs)) * backend.model.config.vocab_size
    return max(1, min(max_rows, LOGITS_BUDGET // per_row))


def resume_sweep(
    backend: Backend,
    builder: SequenceBuilder,
    seqs: Sequence[Layout],
    variants: Sequence[Variant],
    metric: Metric,
    max_rows: int = 256,
    last_only: bool = False,
) -> torch.Tensor:
    """`sweep` (same arguments, same result) skipping the work the variants leave unchanged: one
    intact pass of every example is kept; each (variant, example) row resumes it from its earliest
    edit's layer and position (`HFBackend.resume`), rows grouped by that layer and ordered by that
    position, so a forward pass starts where its rows start to differ. Interventions only: a
    knockout changes the mask of every layer (use `sweep`). The hf backend only: the others run
    whole passes through their own hooks. `last_only`: the metric reads the last position only
    (e.g. `patching.logit_diff`), which then is all it gets (logits [rows, 1, V]), and the last layer
    computes no more than that needs."""
    if not isinstance(backend, HFBackend):
        raise RunError(
            f"resuming from a layer and position needs the hf backend (it runs the model's layers by hand); "
            f"backend {backend.name} runs whole passes: use the full sweep"
        )
    if any(v.knockout is not None for v in variants):
        raise RunError("resume_sweep takes interventions only: a knockout changes every layer's mask")
    batch = builder.collate(list(seqs), side="left")
    if coconut.has_thoughts(batch):
        raise RunError(
            "resuming a kept run cannot recompute the continuous thoughts an edit changes (they are "
            "inputs of later positions): patch a Coconut model with method 'full'"
        )
    kept = backend.keep(batch, last_only)
    rows = _starts(batch, variants)
    results: dict[int, torch.Tensor] = {}
    intact = [(v, e) for layer, _, v, e in rows if layer is None]
    if intact:
        ex_idx = torch.tensor([e for _, e in intact])
        out = metric(kept.logits[ex_idx], _rows(batch, ex_idx), ex_idx)
        results.update({v * len(seqs) + e: value for (v, e), value in zip(intact, out)})
    chunks = _chunks(rows, batch.input_ids.shape[1], max_rows)
    for chunk in progress(chunks, desc="sweep (exact)", unit="pass", leave=False):
        layer, offset = chunk[0][0], chunk[0][1]
        var_idx = torch.tensor([r[2] for r in chunk])
        ex_idx = torch.tensor([r[3] for r in chunk])
        sub = _rows(batch, ex_idx)
        edits = []
        for v in var_idx.unique().tolist():
            mine = (var_idx == v).nonzero()[:, 0]
            edits += variants[v].edits(sub, mine, ex_idx[mine])
        resumed = backend.resume(kept, ex_idx, sub, layer, offset, edits, last_only)
        if last_only:
            logits = resumed
        else:
            logits = kept.logits[ex_idx].clone()
            logits[:, offset:] = resumed
        out = metric(logits, sub, ex_idx)
        results.update({r[2] * len(seqs) + r[3]: value for r, value in zip(chunk, out)})
    flat = torch.stack([results[i] for i in range(len(variants) * len(seqs))])
    return flat.view(len(variants), len(seqs), *flat.shape[1:])


Start = tuple[int | None, int, int, int]  # (layer, position, variant, example); layer None: intact


def _starts(batch: Batch, variants: Sequence[Variant]) -> list[Start]:
    """Where each (variant, example) row starts to differ from the intact run: its variant's earliest
    edited layer and its example's earliest edited position (None, 0 for a row nothing edits)."""
    # Left padding puts an example's blocks at the same positions in every row of `batch`.
    pos = block_positions(batch) if any(v.sites for v in variants) else None
    rows = []
    for v, variant in enumerate(variants):
        sites = [s for s in variant.sites if s.block <= (pos.shape[1] if pos is not None else 0)]
        for e in range(batch.input_ids.shape[0]):
            if variant.intervention is None or not sites:
                rows.append((None, 0, v, e))
                continue
            first = min(int(pos[e, block_index(s.block), s.slot]) for s in sites)
            rows.append((min(s.layer for s in sites), first, v, e))
    return rows


def _chunks(rows: list[Start], length: int, max_rows: int) -> list[list[Start]]:
    """The edited rows in forward passes of at most `max_rows`, by start layer, then start position:
    a pass starts at its first row's position, and takes rows starting later only while they waste
    little (each computes from the pass' start; `length`: the sequences' length)."""
    chunks: list[list[Start]] = []
    for row in sorted(r for r in rows if r[0] is not None):
        start = chunks[-1][0] if chunks else None
        if (
            start is None
            or len(chunks[-1]) == max_rows
            or row[0] != start[0]
            or row[1] - start[1] > (length - start[1]) * WASTE
        ):
            chunks.append([])
        chunks[-1].append(row)
    return chunks


def _rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The batch's rows `rows` (repeats allowed), in that order."""
    return Batch(**{k: v[rows] for k, v in batch.__dict__.items()})


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
