"""Causal analyses of memory blocks: specialisations of the one engine (`engine.sweep`) that share
one signature, `f(lab, selection, **options) -> Result` (TransformerLens style).

- `ablate`: an intervention (zero, mean, resample, or any `Intervention`) on each block alone,
  blocks 1..k, all blocks, and optionally every (layer, block).
- `knockout`: attention edges removed: the answer cannot see block k, block k cannot see earlier
  blocks (every layer: the attention mask is shared by all layers).
- `patch`: clean states patched into a minimally corrupted run, per (layer, block[, slot]):
  `exact` skips the work a patch leaves unchanged (`engine.resume_sweep`, hf backend), `full`
  runs every row as a whole pass (any backend; the same numbers), `attribution` estimates every
  cell from gradients (`attribution`: two forward passes and one backward for all cells).
- `interchange`: example B given example A's states: does B's output become A's answer?
- `decode` / `effect`: greedy answers under an intervention, and per-block readouts of one
  example intact vs intervened.

`lab` is a `rim_lens.analysis.lab.Lab`: it owns the backend, the builder, the examples, and fits
interventions on them. Every result records its selection and intervention.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from rim_lens.analysis import fingerprint
from rim_lens.analysis.backends import HFBackend
from rim_lens.analysis.engine import (
    KNOCKOUTS,
    Knockout,
    Variant,
    answer_scores,
    decode,
    resume_sweep,
    score,
    sweep,
)
from rim_lens.analysis.interventions import Intervention, Patch, ablation
from rim_lens.analysis.results import (
    AblationResult,
    DecodeResult,
    EffectResult,
    InterchangeResult,
    KnockoutResult,
    PatchResult,
    with_intervals,
)
from rim_lens.analysis.sites import Selection, Site, block_labels
from rim_lens.artefacts import PATCH_METHODS
from rim_lens.data.examples import Example
from rim_lens.errors import DataError, RimLensError, RunError
from rim_lens.evaluation import answer_text
from rim_lens.model.layouts import Batch, Layout, SequenceBuilder
from rim_lens.stats import proportion

if TYPE_CHECKING:
    from rim_lens.analysis.lab import Lab


# -- ablation ------------------------------------------------------------------------------------
def ablate(
    lab: Lab, sel: Selection, mode: str | Intervention = "mean", grid: bool = False, seed: int = 0
) -> AblationResult:
    """Accuracy and change in answer log-prob when block states are intervened on.

    Rows: `intact`; each block alone and blocks 1..k cumulatively (over the selected layers and
    slots); all selected blocks together; with `grid`, every single (layer, block).
    """
    intervention = lab.fit(ablation(mode, seed), lab.examples, sel)
    specs: list[tuple[dict, list]] = [({"scope": "intact"}, [])]
    specs += [({"scope": "block", "block": k}, sel.sites(blocks=[k])) for k in sel.blocks]
    specs += [
        ({"scope": "cumulative", "block": k}, sel.sites(blocks=sel.blocks[: i + 1]))
        for i, k in enumerate(sel.blocks)
    ]
    specs.append(({"scope": "all"}, sel.sites()))
    if grid:
        specs += [
            ({"scope": "cell", "layer": l, "block": k}, sel.sites(blocks=[k], layers=[l]))
            for l in sel.layers
            for k in sel.blocks
        ]
    variants = [Variant(sites, intervention if sites else None) for _, sites in specs]
    correct, logprob = score(lab.backend, lab.builder, lab.examples, variants)
    name = mode if isinstance(mode, str) else intervention.kind
    rows = [
        {
            "scope": label["scope"],
            "layer": label.get("layer"),
            "block": label.get("block"),
            "mode": name,
            "logprob": lp.mean().item(),
            "logprob_change": (lp - logprob[0]).mean().item(),
            "n": len(lab.examples),
        }
        for (label, _), lp in zip(specs, logprob)
    ]
    with_intervals(rows, correct.numpy())
    table = pd.DataFrame(rows).astype({"layer": "Int64", "block": "Int64"})
    result = AblationResult(table, correct=correct.numpy())
    intact, every = result.accuracy("intact"), result.accuracy("all")
    result.summary = {
        "mode": name,
        "accuracy_intact": intact.value,
        "accuracy_all_ablated": every.value,
        "intact": intact,
        "all_ablated": every,
        "drop": result.drop(),
        "n": len(lab.examples),
    }
    result.record = lab.record("ablate", sel, intervention, grid=grid, seed=seed)
    return result


# -- attention knockout --------------------------------------------------------------------------------
def knockout(lab: Lab, sel: Selection) -> KnockoutResult:
    """Accuracy when attention edges are removed in every layer, via the attention mask:
    `answer->block` (the readout cannot see block k; a row without a block removes every block)
    and `block->earlier` (block k cannot see the blocks before it). Only the selected slots of a
    block are cut off; the selection's layers must be all of them (the mask is shared)."""
    if list(sel.layers) != list(range(lab.backend.n_layers)):
        raise RunError(
            "knockout acts on every layer (one attention mask serves them all); got layers "
            f"{list(sel.layers)}"
        )
    slots = None if len(sel.slots) == lab.spec.block_slots else sel.slots
    # Block 1 has no earlier blocks, so block->earlier starts at block 2.
    knockouts = [None] + [
        Knockout(kind, k, slots)
        for kind in KNOCKOUTS
        for k in sel.blocks
        if (kind, k) != ("block->earlier", 1)
    ]
    knockouts.append(Knockout("answer->block", None, slots))
    correct, _ = score(lab.backend, lab.builder, lab.examples, [Variant(knockout=k) for k in knockouts])
    rows = [
        {"knockout": k.kind if k else "none", "block": k.block if k else None, "n": len(lab.examples)}
        for k in knockouts
    ]
    with_intervals(rows, correct.numpy())
    # block is empty for "none" and for the answer->block row that removes every block.
    table = pd.DataFrame(rows).astype({"block": "Int64"})
    intact, blind = correct[0].numpy(), correct[-1].numpy()
    summary = {
        "accuracy_intact": float(intact.mean()),
        "accuracy_answer_sees_no_block": float(blind.mean()),
    }
    record = lab.record("knockout", sel, None, knockouts=[k.to_dict() for k in knockouts[1:]])
    return KnockoutResult(table, summary, record, correct=correct.numpy())


# -- activation patching ---------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Clean/corrupt pairs with the answer token where they first differ."""

    clean: list[Example]
    corrupt: list[Example]
    prefix: list[list[int]]  # shared answer tokens before the first difference (teacher-forced)
    clean_token: torch.Tensor
    corrupt_token: torch.Tensor
    changed: list[tuple[int, ...]] = field(default_factory=list)  # the steps (1-based) whose value differs

    def prompts(self, builder: SequenceBuilder, which: str = "corrupt") -> list[Layout]:
        """The clean or corrupt prompts followed by the shared answer prefix: the metric is read
        at their last token."""
        examples = self.clean if which == "clean" else self.corrupt
        return [builder.extend(builder.prompt(ex), p) for ex, p in zip(examples, self.prefix)]

    def subset(self, rows: Sequence[int]) -> Pairs:
        rows = list(rows)
        return Pairs(
            [self.clean[i] for i in rows],
            [self.corrupt[i] for i in rows],
            [self.prefix[i] for i in rows],
            self.clean_token[rows],
            self.corrupt_token[rows],
            [self.changed[i] for i in rows] if self.changed else [],
        )


def make_pairs(lab: Lab, examples: Sequence[Example] | None = None, seed: int = 0) -> Pairs:
    """Corrupt each example minimally (one operand changed, so the answer changes); examples the
    task cannot corrupt, or whose corrupt question tokenizes to another length, are skipped."""
    builder, rng = lab.builder, random.Random(seed)
    chosen = []
    for ex in lab.examples if examples is None else examples:
        try:
            bad = lab.task.corrupt(ex, rng)
        except DataError:  # this example has no single change that alters the answer
            continue
        if len(builder.prompt(bad)) == len(builder.prompt(ex)):
            chosen.append((ex, bad))
    if not chosen:
        raise RunError("no clean/corrupt pairs could be made from these examples")
    return _pairs(builder, chosen)


def given_pairs(lab: Lab, pairs: Sequence[tuple[Example | str, Example | str]]) -> Pairs:
    """The user's own (clean, corrupt) pairs, as examples or data lines of the session's task
    (e.g. `question||steps #### answer`), on any task; their questions may differ in length."""
    parsed = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise RunError(f"pairs[{i}]: expected (clean, corrupt), got {len(pair)} items")
        clean, corrupt = (ex if isinstance(ex, Example) else lab.task.parse_line(ex) for ex in pair)
        if lab.task.answers_match(clean.answer, corrupt.answer):
            raise RunError(
                f"pairs[{i}]: clean and corrupt have the same answer ({clean.answer[:40]!r}); patching "
                "measures how much of the clean answer comes back, so give pairs whose answers differ"
            )
        parsed.append((clean, corrupt))
    if not parsed:
        raise RunError("pairs: no (clean, corrupt) pairs given")
    return _pairs(lab.builder, parsed)


def _pairs(builder: SequenceBuilder, chosen: Sequence[tuple[Example, Example]]) -> Pairs:
    """Pairs with the answer token where each pair's answers first differ."""
    pairs = Pairs([], [], [], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    clean_tok, corrupt_tok = [], []
    for ex, bad in chosen:
        a, b = builder.encode(ex.answer) + [builder.eos], builder.encode(bad.answer) + [builder.eos]
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        pairs.clean.append(ex)
        pairs.corrupt.append(bad)
        pairs.changed.append(changed_steps(ex, bad))
        pairs.prefix.append(a[:i])
        clean_tok.append(a[i])
        corrupt_tok.append(b[i])
    pairs.clean_token, pairs.corrupt_token = torch.tensor(clean_tok), torch.tensor(corrupt_tok)
    return pairs


def changed_steps(clean: Example, corrupt: Example) -> tuple[int, ...]:
    """The steps (1-based) whose value differs between two examples (mult: changing b_0 changes P_1
    only, b_1 P_2 only, a digit of A every partial product); a step one of them lacks counts as changed."""
    steps = max(len(clean.values), len(corrupt.values))
    values = [list(ex.values) + [None] * (steps - len(ex.values)) for ex in (clean, corrupt)]
    return tuple(t for t in range(1, steps + 1) if values[0][t - 1] != values[1][t - 1])


def logit_diff(pairs: Pairs):
    """The metric: logit(clean token) - logit(corrupt token) at the last position of each row."""

    def metric(logits: torch.Tensor, batch: Batch, ex_idx: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]  # left padding: the last position is every row's last token
        rows = torch.arange(len(ex_idx))
        return last[rows, pairs.clean_token[ex_idx]] - last[rows, pairs.corrupt_token[ex_idx]]

    return metric


def patch_method(lab: Lab, method: str | None) -> str:
    """The patching method to run: `method`, or by default `exact` on the hf backend and `full` on
    the others and for Coconut (whose thoughts `exact` cannot recompute); RunError (one line) for
    an unknown one or `exact` where it cannot run."""
    exact = isinstance(lab.backend, HFBackend) and lab.backend.resumable and not lab.spec.uses_thoughts
    method = method or ("exact" if exact else "full")
    if method not in PATCH_METHODS:
        raise RunError(f"unknown patch method {method!r}; choose one of {', '.join(PATCH_METHODS)}")
    if method == "exact" and not isinstance(lab.backend, HFBackend):
        raise RunError(
            f"patch method 'exact' runs the hf model's layers from where each patch starts: backend hf "
            f"only; with backend {lab.backend.name} use method 'full' (the same numbers, whole passes)"
        )
    return method


def patch(
    lab: Lab,
    sel: Selection,
    per_slot: bool = False,
    seed: int = 0,
    pairs: Pairs | None = None,
    max_rows: int = 256,
    method: str | None = None,
) -> PatchResult:
    """Patch clean block states into the corrupt run for every (layer, block) — or
    (layer, block, slot) with `per_slot` — batched: many cells per forward pass.

    The table holds the mean logit difference and the normalised recovery
    (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) per cell; the summary the clean/corrupt
    baselines and the peak (with a bootstrap interval over pairs). `method` (`patch_method`):
    `exact` and `full` give the same numbers, `attribution` estimates them from gradients.
    """
    method = patch_method(lab, method)
    pairs = make_pairs(lab, seed=seed) if pairs is None else pairs
    if method == "attribution":
        from rim_lens.analysis.attribution import attribution_patch

        return attribution_patch(lab, sel, per_slot=per_slot, seed=seed, pairs=pairs)
    intervention = lab.fit(Patch(from_=pairs.clean), pairs.corrupt, sel)
    if per_slot:
        cells = [dict(layer=l, block=k, slot=j) for l in sel.layers for k in sel.blocks for j in sel.slots]
        variants = [Variant([Site(**c)], intervention) for c in cells]
    else:
        cells = [dict(layer=l, block=k) for l in sel.layers for k in sel.blocks]
        variants = [Variant(sel.sites(blocks=[c["block"]], layers=[c["layer"]]), intervention) for c in cells]
    sets = patch_sets(sel)
    variants += [Variant(sites, intervention) for _, sites in sets]
    metric = logit_diff(pairs)
    clean = sweep(lab.backend, lab.builder, pairs.prompts(lab.builder, "clean"), [Variant()], metric)[0]
    seqs, every = pairs.prompts(lab.builder), [Variant(), *variants]
    if method == "exact":  # the metric reads the last position only
        out = resume_sweep(lab.backend, lab.builder, seqs, every, metric, max_rows, last_only=True)
    else:
        out = sweep(lab.backend, lab.builder, seqs, every, metric, max_rows)
    corrupt, patched, set_patched = out[0], out[1 : 1 + len(cells)], out[1 + len(cells) :]
    denom = (clean.mean() - corrupt.mean()).item()

    def row(where: dict, p: torch.Tensor) -> dict:
        recovery = (p.mean() - corrupt.mean()).item() / denom if denom else float("nan")
        return {**where, "logit_diff": p.mean().item(), "recovery": recovery, "n": len(pairs.clean)}

    result = PatchResult(
        pd.DataFrame([row(c, p) for c, p in zip(cells, patched)]),
        clean=clean.double().numpy(),
        corrupt=corrupt.double().numpy(),
        patched=patched.double().numpy(),
        sets=pd.DataFrame([row(label, p) for (label, _), p in zip(sets, set_patched)]).astype(
            {"layer": "Int64", "block": "Int64"}
        ),
        set_patched=set_patched.double().numpy(),
        changed=list(pairs.changed),
    )
    result.summary = {
        "logit_diff_clean": clean.mean().item(),
        "logit_diff_corrupt": corrupt.mean().item(),
        "n": len(pairs.clean),
        "peak": result.peak(),
        "changed": {
            ",".join(map(str, c)) or "none": pairs.changed.count(c) for c in sorted(set(pairs.changed))
        },
    }
    result.record = lab.record(
        "patch", sel, intervention, per_slot=per_slot, seed=seed, pairs=len(pairs.clean), method=method
    )
    return result


def patch_sets(sel: Selection) -> list[tuple[dict, list[Site]]]:
    """The sets of sites patched together, as `ablate` scopes them, each with its label: every block
    at layer l (`layer`), block k at every layer (`block`), blocks 1..k at every layer
    (`blocks`), and everything (`all`)."""
    sets = [({"scope": "layer", "layer": l, "block": None}, sel.sites(layers=[l])) for l in sel.layers]
    sets += [({"scope": "block", "layer": None, "block": k}, sel.sites(blocks=[k])) for k in sel.blocks]
    sets += [
        ({"scope": "blocks", "layer": None, "block": k}, sel.sites(blocks=sel.blocks[: i + 1]))
        for i, k in enumerate(sel.blocks)
    ]
    return [*sets, ({"scope": "all", "layer": None, "block": None}, sel.sites())]


# -- interchange ---------------------------------------------------------------------------------------
def interchange(lab: Lab, sel: Selection, seed: int = 0, grid: bool = True) -> InterchangeResult:
    """Give example B the block states of example A (pairs with different answers), at one
    layer or all selected layers and one block or all selected blocks. Reports how often the
    output becomes A's answer (`to_A`), stays B's, or is neither, how often it becomes what the
    model outputs for A (`to_A_output`), and, graded, how often it changes from what the model
    outputs for B (`changed`), how far A's answer's log-prob rises (`logprob_gain`), and, with
    every block swapped, the share of answer tokens that take A's output's value where A's and
    B's outputs differ (`summary["donor_tokens"]`). Then the matched/unmatched-value interchange
    per step (`value_interchange`)."""
    examples = lab.examples
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    pairs = [(a, b) for a, b in zip(order[::2], order[1::2]) if examples[a].answer != examples[b].answer]
    if not pairs:
        raise RunError("interchange needs examples with different answers")
    A = [examples[a] for a, _ in pairs]
    B = [examples[b] for _, b in pairs]
    swap = lab.fit(Patch(from_=A), B, sel)
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
    variants = [Variant(c["sites"], swap if c["sites"] else None) for c in cells]
    says_a, logprob_a = score(lab.backend, lab.builder, B, variants, answers=[ex.answer for ex in A])
    says_b, _ = score(lab.backend, lab.builder, B, variants)
    # What the model actually outputs for A and for B: for an inaccurate model, "becomes A's answer"
    # undercounts, and "stays B's answer" is not "unchanged".
    a_outputs, b_outputs = decode_texts(lab, A), decode_texts(lab, B)
    says_a_output, _ = score(lab.backend, lab.builder, B, variants, answers=a_outputs)
    says_b_output, _ = score(lab.backend, lab.builder, B, variants, answers=b_outputs)
    gain = (logprob_a - logprob_a[0]).double().numpy()
    rows = []
    for c, a, b, ao, bo, g in zip(
        cells, says_a.float(), says_b.float(), says_a_output.float(), says_b_output.float(), gain
    ):
        rows.append(
            {
                "swap": c["swap"],
                "layer": c["layer"],
                "block": c["block"],
                "stays_B": b.mean().item(),
                "neither": (1 - a - b).clamp_min(0).mean().item(),
                "to_A_output": ao.mean().item(),
                "changed": 1 - bo.mean().item(),
                "logprob_gain": float(g.mean()),
                "n": len(pairs),
            }
        )
    with_intervals(rows, says_a.numpy(), key="to_A")
    table = pd.DataFrame(rows).astype({"layer": "Int64", "block": "Int64"})
    every = int(np.flatnonzero(table["swap"].to_numpy() == "all")[0])
    swapped = decode_texts(lab, B, variants[every])
    result = InterchangeResult(
        table,
        to_a=says_a.numpy(),
        pairs=pairs,
        changed=~says_b_output.numpy(),
        logprob_gain=gain,
        donor_tokens=donor_tokens(a_outputs, b_outputs, swapped),
    )
    result.values = value_interchange(lab, sel, seed)
    row = table.iloc[every]
    result.summary = {
        "transfer_rate": float(row["to_A"]),
        "transfer": result.transfer("all"),
        "stays_B": float(row["stays_B"]),
        "neither": float(row["neither"]),
        "changed": result.changed_rate("all"),
        "logprob_gain": result.gain("all"),
        "donor_tokens": result.donor_share(),
        "intact_B_correct": float(table[table["swap"] == "none"].iloc[0]["stays_B"]),
        "pairs": len(pairs),
    }
    result.record = lab.record("interchange", sel, swap, seed=seed, grid=grid, pairs=len(pairs))
    return result


def donor_tokens(donor: Sequence[str], base: Sequence[str], swapped: Sequence[str]) -> np.ndarray:
    """Per pair, the share of answer tokens (words) that take the donor's value where the donor's
    and the base's answers differ (aligned by position; NaN where they differ nowhere)."""
    out = []
    for d, b, s in zip(donor, base, swapped):
        d, b, s = d.split(), b.split(), s.split()
        differ = [i for i in range(min(len(d), len(b))) if d[i] != b[i]]
        out.append(np.mean([i < len(s) and s[i] == d[i] for i in differ]) if differ else np.nan)
    return np.array(out, dtype=float)


# The matched/unmatched-value interchange: pairs per step and kind (CODI-style analyses use this test).
VALUE_PAIRS = 64


def value_interchange(lab: Lab, sel: Selection, seed: int = 0) -> pd.DataFrame:
    """Per step t of the task's causal model, swap block k's states (every selected layer and slot)
    or every block's from a donor into a base: with a donor whose step-t value equals the base's
    (`matched`), how often the base's output stays as it was; with one whose value differs
    (`unmatched`), how often it becomes the causal model's counterfactual (the base's answer with
    step t taken from the donor). Rows: step, block (None: every block), kind, rate with its
    Wilson interval, n. Empty if the task has no causal model."""
    from rim_lens.data.causal import STEP

    try:
        model = lab.task.causal_model()
        steps = [v for v in model.variables(lab.examples) if v.kind == STEP]
    except RimLensError:  # e.g. a task without a causal model
        return pd.DataFrame()
    examples, rng = lab.examples, random.Random(seed)
    outputs = decode_texts(lab, examples)
    swaps = [(k, sel.sites(blocks=[k])) for k in sel.blocks] + [(None, sel.sites())]
    rows = []
    for var in steps:
        values = [model.values(ex).get(var.name) for ex in examples]
        matched, unmatched = [], []
        for b, base in enumerate(examples):
            for d, donor in enumerate(examples):
                if d == b or donor.question == base.question or values[b] is None or values[d] is None:
                    continue
                if values[d] == values[b]:
                    matched.append((d, b, outputs[b]))
                    continue
                answer = model.counterfactual(base, donor, var.name)
                if answer is not None and not lab.task.answers_match(answer, base.answer):
                    unmatched.append((d, b, answer))
        for kind, found in (("matched", matched), ("unmatched", unmatched)):
            chosen = rng.sample(found, min(VALUE_PAIRS, len(found)))
            if not chosen:
                continue
            donors = [examples[d] for d, _, _ in chosen]
            bases = [examples[b] for _, b, _ in chosen]
            swap = lab.fit(Patch(from_=donors), bases, sel)
            variants = [Variant(sites, swap) for _, sites in swaps]
            hits, _ = score(lab.backend, lab.builder, bases, variants, answers=[a for _, _, a in chosen])
            for (k, _), h in zip(swaps, hits.numpy()):
                e = proportion(h)
                rows.append(
                    {"step": var.step, "block": k, "kind": kind, "rate": e.value, "rate_lo": e.lo,
                     "rate_hi": e.hi, "n": e.n}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=["step", "block", "kind", "rate", "rate_lo", "rate_hi", "n"]).astype(
        {"block": "Int64"}
    )


# -- decoding under an intervention --------------------------------------------------------------------
def decode_texts(
    lab: Lab, examples: Sequence[Example], variant: Variant | None = None, **options
) -> list[str]:
    """Greedy answers (text) of `examples` under `variant` (default: intact)."""
    decoded = decode(lab.backend, lab.builder, examples, variant, **options)
    return [answer_text(lab.tokenizer, ids, lab.spec) for ids in decoded.tokens]


def decode_under(
    lab: Lab,
    sel: Selection | None,
    intervention: Intervention | None = None,
    examples: Sequence[Example] | None = None,
    n_blocks: int | None = None,
    max_new_tokens: int = 32,
) -> DecodeResult:
    """Greedy answers of `examples` (default: the session's) with `intervention` at the selected
    sites of the prompt (read out after `n_blocks` blocks; default K)."""
    examples = list(lab.examples if examples is None else examples)
    variant = Variant()
    if intervention is not None:
        variant = Variant(sel.sites(), lab.fit(intervention, examples, sel))
    decoded = decode(lab.backend, lab.builder, examples, variant, n_blocks, max_new_tokens)
    texts = [answer_text(lab.tokenizer, ids, lab.spec) for ids in decoded.tokens]
    table = pd.DataFrame(
        {
            "id": [ex.id for ex in examples],
            "question": [ex.question for ex in examples],
            "gold": [ex.answer for ex in examples],
            "answer": texts,
            "correct": [lab.task.answers_match(t, ex.answer) for t, ex in zip(texts, examples)],
            "logprob": [float(np.sum(lp)) for lp in decoded.logprobs],
        }
    )
    result = DecodeResult(table, logprobs=decoded.logprobs)
    n_blocks = n_blocks or lab.spec.latent_blocks
    result.summary = {"accuracy": result.accuracy(), "n": len(examples), "n_blocks": n_blocks}
    result.record = lab.record(
        "decode",
        sel,
        intervention,
        decoded=fingerprint.examples_fingerprint([ex.id or ex.question for ex in examples]),
        n_blocks=n_blocks,
        max_new_tokens=max_new_tokens,
    )
    return result


def effect(lab: Lab, sel: Selection, example: Example, intervention: Intervention) -> EffectResult:
    """One example read out after every block k, intact and with `intervention` at the selected
    sites of blocks 1..k: the readouts, whether they are right, and the gold answer's log-prob."""
    fitted = lab.fit(intervention, [example], sel)
    rows = []
    for k in block_labels(lab.spec.latent_blocks):
        variant = Variant([s for s in sel.sites() if s.block <= k], fitted)
        seq = lab.builder.scored(example, n_blocks=k)
        metric = sweep(lab.backend, lab.builder, [seq], [Variant(), variant], _logprob)[:, 0]
        before, after = (decode_texts(lab, [example], v, n_blocks=k)[0] for v in (Variant(), variant))
        rows.append(
            {
                "block": k,
                "readout_before": before,
                "readout_after": after,
                "correct_before": bool(lab.task.answers_match(before, example.answer)),
                "correct_after": bool(lab.task.answers_match(after, example.answer)),
                "logprob_before": float(metric[0]),
                "logprob_after": float(metric[1]),
                "sites": len(variant.sites),
            }
        )
    table = pd.DataFrame(rows)
    table["changed"] = table["readout_before"] != table["readout_after"]
    return EffectResult(table, {"example": example.id}, lab.record("effect", sel, fitted, example=example.id))


def _logprob(logits: torch.Tensor, batch: Batch, ex_idx: torch.Tensor) -> torch.Tensor:
    return answer_scores(logits, batch)[1]
