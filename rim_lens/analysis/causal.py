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
from dataclasses import dataclass
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
from rim_lens.errors import DataError, RunError
from rim_lens.evaluation import answer_text
from rim_lens.model.layouts import Batch, Layout, SequenceBuilder

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
        )


def make_pairs(lab: Lab, examples: Sequence[Example] | None = None, seed: int = 0) -> Pairs:
    """Corrupt each example minimally (one operand changed, so the answer changes); examples the
    task cannot corrupt, or whose corrupt question tokenizes to another length, are skipped."""
    builder, rng = lab.builder, random.Random(seed)
    pairs = Pairs([], [], [], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    clean_tok, corrupt_tok = [], []
    for ex in lab.examples if examples is None else examples:
        try:
            bad = lab.task.corrupt(ex, rng)
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
    exact = isinstance(lab.backend, HFBackend) and not lab.spec.uses_thoughts
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
    metric = logit_diff(pairs)
    clean = sweep(lab.backend, lab.builder, pairs.prompts(lab.builder, "clean"), [Variant()], metric)[0]
    seqs, every = pairs.prompts(lab.builder), [Variant(), *variants]
    if method == "exact":  # the metric reads the last position only
        out = resume_sweep(lab.backend, lab.builder, seqs, every, metric, max_rows, last_only=True)
    else:
        out = sweep(lab.backend, lab.builder, seqs, every, metric, max_rows)
    corrupt, patched = out[0], out[1:]
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
    result = PatchResult(
        pd.DataFrame(rows),
        clean=clean.double().numpy(),
        corrupt=corrupt.double().numpy(),
        patched=patched.double().numpy(),
    )
    result.summary = {
        "logit_diff_clean": clean.mean().item(),
        "logit_diff_corrupt": corrupt.mean().item(),
        "n": len(pairs.clean),
        "peak": result.peak(),
    }
    result.record = lab.record(
        "patch", sel, intervention, per_slot=per_slot, seed=seed, pairs=len(pairs.clean), method=method
    )
    return result


# -- interchange ---------------------------------------------------------------------------------------
def interchange(lab: Lab, sel: Selection, seed: int = 0, grid: bool = True) -> InterchangeResult:
    """Give example B the block states of example A (pairs with different answers), at one
    layer or all selected layers and one block or all selected blocks. Reports how often the
    output becomes A's answer (`to_A`), stays B's, or is neither, and how often it becomes what
    the model outputs for A (`to_A_output`)."""
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
    says_a, _ = score(lab.backend, lab.builder, B, variants, answers=[ex.answer for ex in A])
    says_b, _ = score(lab.backend, lab.builder, B, variants)
    # What A's model actually outputs: for an inaccurate model, "becomes A's answer" undercounts.
    a_outputs = decode_texts(lab, A)
    says_a_output, _ = score(lab.backend, lab.builder, B, variants, answers=a_outputs)
    rows = []
    for c, a, b, ao in zip(cells, says_a.float(), says_b.float(), says_a_output.float()):
        rows.append(
            {
                "swap": c["swap"],
                "layer": c["layer"],
                "block": c["block"],
                "stays_B": b.mean().item(),
                "neither": (1 - a - b).clamp_min(0).mean().item(),
                "to_A_output": ao.mean().item(),
                "n": len(pairs),
            }
        )
    with_intervals(rows, says_a.numpy(), key="to_A")
    table = pd.DataFrame(rows).astype({"layer": "Int64", "block": "Int64"})
    result = InterchangeResult(table, to_a=says_a.numpy(), pairs=pairs)
    every = table[table["swap"] == "all"].iloc[0]
    result.summary = {
        "transfer_rate": float(every["to_A"]),
        "transfer": result.transfer("all"),
        "stays_B": float(every["stays_B"]),
        "neither": float(every["neither"]),
        "intact_B_correct": float(table[table["swap"] == "none"].iloc[0]["stays_B"]),
        "pairs": len(pairs),
    }
    result.record = lab.record("interchange", sel, swap, seed=seed, grid=grid, pairs=len(pairs))
    return result


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
