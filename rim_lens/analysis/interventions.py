"""Causal interventions on memory blocks: ablation, attention knockout, activation patching
and interchange.

Every intervention is scored teacher-forced: the prompt (question, blocks, answer prefix) is
followed by an answer and the end token, and a readout counts as that answer when the argmax
at every answer position is the answer's token, which is exactly when greedy decoding emits
it. Many variants share one forward pass: each batch row is one (variant, example) pair, with
its own edits (see `backends.Edit`) or its own attention mask.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import pandas as pd
import torch

from rim_lens.analysis.backends import Backend, Edit, HFBackend
from rim_lens.analysis.capture import block_states
from rim_lens.data.examples import Example
from rim_lens.data.tasks import Task
from rim_lens.errors import DataError, RunError
from rim_lens.evaluation import answer_text, decode_answers
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import Batch, Layout, Role, SequenceBuilder, block_positions, collate

Site = tuple[int, int, int]  # (layer, block k 1-based, slot j)
# values(example indices [N], layer, block, slot) -> states [N, d_model]
Values = Callable[[torch.Tensor, int, int, int], torch.Tensor]
ABLATIONS = ("zero", "mean", "resample")


@dataclass
class Variant:
    """One intervention: overwrite `sites` with `values` (no sites: the model left intact)."""

    sites: list[Site]
    values: Values | None = None


@dataclass
class Selection:
    """The layers, blocks (1-based) and slots an intervention covers."""

    layers: list[int]
    blocks: list[int]
    slots: list[int]

    def sites(self, blocks: Seq[int] | None = None, layers: Seq[int] | None = None) -> list[Site]:
        return [
            (l, k, j) for l in (layers or self.layers) for k in (blocks or self.blocks) for j in self.slots
        ]


def select(
    backend: Backend,
    K: int,
    M: int,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    slots: Seq[int] | None = None,
) -> Selection:
    """A validated selection; None means all (edits reach layers 0..n_layers-1)."""

    def check(values, lo, hi, what):
        values = list(range(lo, hi + 1)) if values is None else sorted(set(values))
        bad = [v for v in values if not lo <= v <= hi]
        if bad or not values:
            raise RunError(f"{what} {bad or values} out of range: {what}s are {lo}..{hi}")
        return values

    return Selection(
        check(layers, 0, backend.n_layers - 1, "layer"),
        check(blocks, 1, K, "block"),
        check(slots, 0, M + 1, "slot"),
    )


# -- scoring -------------------------------------------------------------------------------------
def answer_scores(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether greedy decoding reproduces the target tokens, and their total log-prob."""
    has = batch.targets != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0]
    correct = ((logits.argmax(-1) == batch.targets) | ~has).all(1)
    return correct, (logp * has).sum(1)


def run_variants(
    backend: Backend,
    seqs: Seq[Layout],
    variants: Seq[Variant],
    metric: Callable[[torch.Tensor, Batch, torch.Tensor], torch.Tensor],
    pad_id: int,
    sees_question: bool = True,
    max_rows: int = 256,
    mask_edit: Callable[[Batch, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """metric for every (variant, example): Tensor [n_variants, n_examples, ...].

    `metric(logits, batch, example_index)` returns one value (or vector) per row; `mask_edit`
    may change the batch's attention mask in place given (batch, variant index, example index).
    """
    n = len(seqs)
    pairs = [(v, e) for v in range(len(variants)) for e in range(n)]
    results = []
    for start in range(0, len(pairs), max_rows):
        chunk = torch.tensor(pairs[start : start + max_rows])
        var_idx, ex_idx = chunk[:, 0], chunk[:, 1]
        batch = collate([seqs[e] for e in ex_idx.tolist()], pad_id, sees_question, side="left")
        if mask_edit is not None:
            mask_edit(batch, var_idx, ex_idx)
        pos = block_positions(batch)
        edits = []
        for v in var_idx.unique().tolist():
            rows = (var_idx == v).nonzero()[:, 0]
            for l, k, j in variants[v].sites:
                edits.append(Edit(l, rows, pos[rows, k - 1, j], variants[v].values(ex_idx[rows], l, k, j)))
        out = backend.run(batch, edits=edits)
        results.append(metric(out.logits, batch, ex_idx))
    flat = torch.cat(results)
    return flat.view(len(variants), n, *flat.shape[1:])


def decode_with_edits(
    backend: HFBackend,
    builder: SequenceBuilder,
    examples: Seq[Example],
    variant: Variant,
    n_blocks: int | None = None,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers of `examples` with `variant` applied to the block states of the prompt
    (read out after `n_blocks` blocks; default K). Needs the hf backend, which can decode."""
    prompts = [builder.prompt(ex, n_blocks) for ex in examples]
    tok, sq = builder.tokenizer, builder.spec.readout_sees_question
    pos = block_positions(collate(prompts, tok.pad_token_id, sq, side="left"))
    rows, index = torch.arange(len(examples)), torch.arange(len(examples))
    edits = [
        Edit(l, rows, pos[:, k - 1, j], variant.values(index, l, k, j))
        for l, k, j in variant.sites
        if k <= pos.shape[1]
    ]
    decoded = greedy_decode(
        backend.model,
        prompts,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=max_new_tokens,
        sees_question=sq,
        prefill_context=backend.editing(edits),
    )
    return [answer_text(tok, ids, builder.spec) for ids in decoded.tokens]


def scored_sequences(
    builder: SequenceBuilder, examples: Seq[Example], answers: Seq[str] | None = None
) -> list[Layout]:
    return [builder.scored(ex, None if answers is None else answers[i]) for i, ex in enumerate(examples)]


def clean_states(
    backend: Backend, builder: SequenceBuilder, examples: Seq[Example], batch_size: int = 64
) -> torch.Tensor:
    """Block states of every example at layers 0..n_layers-1: [n, n_layers, K, M + 2, d]."""
    layers = list(range(backend.n_layers))
    return torch.cat(
        [
            block_states(backend, builder, examples[i : i + batch_size], layers)[0]
            for i in range(0, len(examples), batch_size)
        ]
    )


def _answers(
    backend: Backend, builder: SequenceBuilder, seqs: list[Layout], variants: list[Variant]
) -> tuple[torch.Tensor, torch.Tensor]:
    def metric(logits, batch, ex_idx):
        correct, logprob = answer_scores(logits, batch)
        return torch.stack([correct.float(), logprob], -1)

    out = run_variants(
        backend, seqs, variants, metric, builder.tokenizer.pad_token_id, builder.spec.readout_sees_question
    )
    return out[..., 0].bool(), out[..., 1]


# -- ablation ------------------------------------------------------------------------------------
def ablation_values(states: torch.Tensor, mode: str, seed: int = 0) -> Values:
    """Replacement states: zeros, the mean over examples, or another example's (resample).
    `states` are the clean block states [n, n_layers, K, M + 2, d] of the same examples."""
    if mode == "zero":
        return lambda ex, l, k, j: torch.zeros(len(ex), states.shape[-1])
    if mode == "mean":
        mean = states.mean(0)
        return lambda ex, l, k, j: mean[l, k - 1, j].expand(len(ex), -1)
    if mode == "resample":
        n = states.shape[0]
        gen = torch.Generator().manual_seed(seed)
        # A derangement-ish shift keeps every example from drawing its own states.
        donor = (torch.arange(n) + torch.randint(1, max(n, 2), (n,), generator=gen)) % n
        return lambda ex, l, k, j: states[donor[ex], l, k - 1, j]
    raise RunError(f"unknown ablation mode {mode!r}; choose one of {', '.join(ABLATIONS)}")


def ablate(
    backend: Backend,
    builder: SequenceBuilder,
    examples: Seq[Example],
    sel: Selection,
    mode: str = "mean",
    seed: int = 0,
    states: torch.Tensor | None = None,
    grid: bool = False,
) -> pd.DataFrame:
    """Accuracy and change in answer log-prob when block states are ablated.

    Rows: `intact`; each block alone and blocks 1..k cumulatively (over the selected layers
    and slots); all selected blocks together; with `grid`, every single (layer, block).
    """
    states = clean_states(backend, builder, examples) if states is None else states
    values = ablation_values(states, mode, seed)
    specs: list[tuple[dict, list[Site]]] = [({"scope": "intact"}, [])]
    for k in sel.blocks:
        specs.append(({"scope": "block", "block": k}, sel.sites(blocks=[k])))
    for i, k in enumerate(sel.blocks):
        specs.append(({"scope": "cumulative", "block": k}, sel.sites(blocks=sel.blocks[: i + 1])))
    specs.append(({"scope": "all"}, sel.sites()))
    if grid:
        specs += [
            ({"scope": "cell", "layer": l, "block": k}, sel.sites(blocks=[k], layers=[l]))
            for l in sel.layers
            for k in sel.blocks
        ]
    correct, logprob = _answers(
        backend, builder, scored_sequences(builder, examples), [Variant(s, values) for _, s in specs]
    )
    rows = []
    for (label, _), c, lp in zip(specs, correct, logprob):
        rows.append(
            {
                "scope": label["scope"],
                "layer": label.get("layer"),
                "block": label.get("block"),
                "mode": mode,
                "accuracy": c.float().mean().item(),
                "logprob": lp.mean().item(),
                "logprob_change": (lp - logprob[0]).mean().item(),
                "n": len(examples),
            }
        )
    return pd.DataFrame(rows).astype({"layer": "Int64", "block": "Int64"})


# -- attention knockout ----------------------------------------------------------------------------
KNOCKOUTS = ("answer->block", "block->earlier")


def knockout(
    backend: Backend, builder: SequenceBuilder, examples: Seq[Example], blocks: Seq[int] | None = None
) -> pd.DataFrame:
    """Accuracy when attention edges are removed in every layer, via the attention mask:
    `answer->block` (the answer readout cannot see block k; k = "all" removes every block)
    and `block->earlier` (block k cannot see blocks before it)."""
    K = builder.spec.K
    blocks = list(range(1, K + 1)) if blocks is None else list(blocks)
    # Block 1 has no earlier blocks, so block->earlier starts at block 2.
    specs = [("intact", None)] + [
        (kind, k) for kind in KNOCKOUTS for k in blocks if (kind, k) != ("block->earlier", 1)
    ]
    specs.append(("answer->block", "all"))

    def mask_edit(batch: Batch, var_idx: torch.Tensor, ex_idx: torch.Tensor) -> None:
        is_block = (batch.roles >= Role.BLOCK_BEGIN) & (batch.roles <= Role.BLOCK_END)
        blocked = torch.zeros(
            batch.attention_mask.shape[0], batch.roles.shape[1], batch.roles.shape[1], dtype=torch.bool
        )
        for row, v in enumerate(var_idx.tolist()):
            kind, k = specs[v]
            if kind == "intact":
                continue
            keys = is_block[row] & ((batch.blocks[row] == k) if k != "all" else True)
            if kind == "answer->block":
                queries = batch.roles[row] == Role.READOUT
            else:
                queries = is_block[row] & (batch.blocks[row] == k)
                keys = is_block[row] & (batch.blocks[row] < k)
            blocked[row] = queries[:, None] & keys[None, :]
        batch.attention_mask.masked_fill_(blocked[:, None], torch.finfo(batch.attention_mask.dtype).min)

    def metric(logits, batch, ex_idx):
        return answer_scores(logits, batch)[0].float()

    seqs = scored_sequences(builder, examples)
    acc = run_variants(
        backend,
        seqs,
        [Variant([]) for _ in specs],
        metric,
        builder.tokenizer.pad_token_id,
        builder.spec.readout_sees_question,
        mask_edit=mask_edit,
    )
    table = pd.DataFrame(
        [
            {
                "knockout": kind if kind != "intact" else "none",
                "block": k if isinstance(k, int) else None,
                "accuracy": a.mean().item(),
                "n": len(examples),
            }
            for (kind, k), a in zip(specs, acc)
        ]
    )
    # block is empty for "none" and for the answer->block row that removes every block.
    return table.astype({"block": "Int64"})


# -- activation patching ---------------------------------------------------------------------------
@dataclass
class Pairs:
    """Clean/corrupt pairs with the answer token where they first differ."""

    clean: list[Example]
    corrupt: list[Example]
    prefix: list[list[int]]  # shared answer tokens before the first difference (teacher-forced)
    clean_token: torch.Tensor
    corrupt_token: torch.Tensor


def make_pairs(task: Task, builder: SequenceBuilder, examples: Seq[Example], seed: int = 0) -> Pairs:
    """Corrupt each example minimally (one operand changed, so the answer changes); examples the
    task cannot corrupt, or whose corrupt question tokenizes to another length, are skipped."""
    rng = random.Random(seed)
    pairs = Pairs([], [], [], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    clean_tok, corrupt_tok = [], []
    for ex in examples:
        try:
            bad = task.corrupt(ex, rng)
        except DataError:  # this example has no single change that alters the answer
            continue
        if len(builder.prompt(bad)) != len(builder.prompt(ex)):
            continue
        a, b = builder.encode(ex.answer) + [builder.eos], builder.encode(bad.answer) + [builder.eos]
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        pairs.clean.append(ex)
        pairs.corrupt.append(bad)
        pairs.prefix.append(a[:i])
        clean_tok.append(a[i])
        corrupt_tok.append(b[i])
    if not pairs.clean:
        raise RunError("no clean/corrupt pairs could be made from these examples")
    pairs.clean_token, pairs.corrupt_token = torch.tensor(clean_tok), torch.tensor(corrupt_tok)
    return pairs


def _with_prefix(builder: SequenceBuilder, ex: Example, tokens: list[int]) -> Layout:
    seq = builder.prompt(ex)
    for tok in tokens:
        seq.add(tok, seq.positions[-1] + 1, Role.READOUT, block=seq.blocks[-1])
    return seq


def logit_diff_metric(pairs: Pairs) -> Callable[[torch.Tensor, Batch, torch.Tensor], torch.Tensor]:
    """logit(clean token) - logit(corrupt token) at the last position of each row."""

    def metric(logits, batch, ex_idx):
        last = logits[:, -1]  # left padding: the last position is every row's last token
        rows = torch.arange(len(ex_idx))
        return last[rows, pairs.clean_token[ex_idx]] - last[rows, pairs.corrupt_token[ex_idx]]

    return metric


def patch(
    backend: Backend,
    builder: SequenceBuilder,
    pairs: Pairs,
    sel: Selection,
    per_slot: bool = False,
    max_rows: int = 256,
) -> tuple[pd.DataFrame, dict]:
    """Patch clean block states into the corrupt run for every (layer, block) — or
    (layer, block, slot) with `per_slot` — batched: many cells per forward pass.

    Returns the grid with the mean logit difference and the normalised recovery
    (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), and the clean/corrupt baselines.
    """
    states = clean_states(backend, builder, pairs.clean)
    values: Values = lambda ex, l, k, j: states[ex, l, k - 1, j]  # noqa: E731
    if per_slot:
        cells = [dict(layer=l, block=k, slot=j) for l in sel.layers for k in sel.blocks for j in sel.slots]
        variants = [Variant([(c["layer"], c["block"], c["slot"])], values) for c in cells]
    else:
        cells = [dict(layer=l, block=k) for l in sel.layers for k in sel.blocks]
        variants = [Variant([(c["layer"], c["block"], j) for j in sel.slots], values) for c in cells]
    metric, pad = logit_diff_metric(pairs), builder.tokenizer.pad_token_id
    sq = builder.spec.readout_sees_question
    clean = run_variants(
        backend,
        [_with_prefix(builder, ex, p) for ex, p in zip(pairs.clean, pairs.prefix)],
        [Variant([])],
        metric,
        pad,
        sq,
    )[0]
    corrupt_seqs = [_with_prefix(builder, ex, p) for ex, p in zip(pairs.corrupt, pairs.prefix)]
    patched = run_variants(
        backend, corrupt_seqs, [Variant([])] + variants, metric, pad, sq, max_rows=max_rows
    )
    corrupt, patched = patched[0], patched[1:]
    denom = (clean.mean() - corrupt.mean()).item()
    rows = [
        {
            **c,
            "logit_diff": p.mean().item(),
            "recovery": (p.mean() - corrupt.mean()).item() / denom if denom else float("nan"),
            "n": len(pairs.clean),
        }
        for c, p in zip(cells, patched)
    ]
    return pd.DataFrame(rows), {
        "logit_diff_clean": clean.mean().item(),
        "logit_diff_corrupt": corrupt.mean().item(),
        "n": len(pairs.clean),
    }


# -- interchange -----------------------------------------------------------------------------------
def interchange(
    backend: Backend,
    builder: SequenceBuilder,
    examples: Seq[Example],
    sel: Selection,
    seed: int = 0,
    grid: bool = True,
) -> tuple[pd.DataFrame, list[tuple[int, int]]]:
    """Give example B the block states of example A (pairs with different answers), at one
    layer or all selected layers and one block or all selected blocks. Reports how often the
    output becomes A's answer, stays B's, or is neither, and how often it becomes what the
    model outputs for A (`to_A_output`)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    pairs = [(a, b) for a, b in zip(order[::2], order[1::2]) if examples[a].answer != examples[b].answer]
    if not pairs:
        raise RunError("interchange needs examples with different answers")
    A = [examples[a] for a, _ in pairs]
    B = [examples[b] for _, b in pairs]
    donor = clean_states(backend, builder, A)
    values: Values = lambda ex, l, k, j: donor[ex, l, k - 1, j]  # noqa: E731
    # layer / block None: every selected layer / block swapped at once.
    cells = [
        dict(swap="none", layer=None, block=None, sites=[]),
        dict(swap="all", layer=None, block=None, sites=sel.sites()),
    ]
    if grid:
        cells += [dict(swap="block", layer=None, block=k, sites=sel.sites(blocks=[k])) for k in sel.blocks]
        cells += [dict(swap="layer", layer=l, block=None, sites=sel.sites(layers=[l])) for l in sel.layers]
        cells += [
            dict(swap="cell", layer=l, block=k, sites=sel.sites(blocks=[k], layers=[l]))
            for l in sel.layers
            for k in sel.blocks
        ]
    variants = [Variant(c["sites"], values) for c in cells]
    says_a, _ = _answers(backend, builder, scored_sequences(builder, B, [ex.answer for ex in A]), variants)
    says_b, _ = _answers(backend, builder, scored_sequences(builder, B), variants)
    # What A's model actually outputs: for an inaccurate model, "becomes A's answer" undercounts.
    a_outputs = [r.text for r in decode_answers(backend.model, builder.tokenizer, builder, A)]
    says_a_output, _ = _answers(backend, builder, scored_sequences(builder, B, a_outputs), variants)
    rows = []
    for c, a, b, ao in zip(cells, says_a.float(), says_b.float(), says_a_output.float()):
        rows.append(
            {
                "swap": c["swap"],
                "layer": c["layer"],
                "block": c["block"],
                "to_A": a.mean().item(),
                "stays_B": b.mean().item(),
                "neither": (1 - a - b).clamp_min(0).mean().item(),
                "to_A_output": ao.mean().item(),
                "n": len(pairs),
            }
        )
    return pd.DataFrame(rows).astype({"layer": "Int64", "block": "Int64"}), pairs
