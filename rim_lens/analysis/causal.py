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

`lab` is a `rim_lens.analysis.session.Session`: it owns the backend, the builder, the examples, and fits
interventions on them. Every result records its selection and intervention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from rim_lens.analysis import figures, fingerprint
from rim_lens.analysis.engine import (
    KNOCKOUTS,
    Knockout,
    Variant,
    answer_scores,
    decode,
    score,
    sweep,
)
from rim_lens.analysis.interventions import Intervention, ablation
from rim_lens.analysis.results import Result, estimate_of, with_intervals
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, block_labels
from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.evaluation import answer_text
from rim_lens.model.layouts import Batch
from rim_lens.stats import Estimate, bootstrap


# -- ablation ------------------------------------------------------------------------------------
def ablate(
    lab: Session, sel: Selection, mode: str | Intervention = "mean", grid: bool = False, seed: int = 0
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
def knockout(lab: Session, sel: Selection) -> KnockoutResult:
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


# -- decoding under an intervention --------------------------------------------------------------------
def decode_texts(
    lab: Session, examples: Sequence[Example], variant: Variant | None = None, **options
) -> list[str]:
    """Greedy answers (text) of `examples` under `variant` (default: intact)."""
    decoded = decode(lab.backend, lab.builder, examples, variant, **options)
    return [answer_text(lab.tokenizer, ids, lab.spec) for ids in decoded.tokens]


def decode_under(
    lab: Session,
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


def effect(lab: Session, sel: Selection, example: Example, intervention: Intervention) -> EffectResult:
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


# -- causal ------------------------------------------------------------------------------------------
@dataclass(repr=False)
class AblationResult(Result):
    """Accuracy and answer log-prob with block states ablated: intact, each block alone, blocks
    1..k, all selected blocks, and with `grid` every (layer, block). `correct` holds the
    per-example outcomes [rows of the table, examples]."""

    correct: np.ndarray | None = None
    name: ClassVar[str] = "ablate"

    def accuracy(self, scope: str = "intact") -> Estimate:
        """Accuracy of one scope (intact, all) with its Wilson interval."""
        return estimate_of(self.correct[self._row(scope)])

    def drop(self) -> Estimate:
        """Intact minus all-ablated accuracy, with a bootstrap interval over examples (paired)."""
        diff = self.correct[self._row("intact")].astype(float) - self.correct[self._row("all")]
        return bootstrap(diff)

    def _row(self, scope: str) -> int:
        return int(np.flatnonzero(self.table["scope"].to_numpy() == scope)[0])

    def figures(self) -> dict[str, go.Figure]:
        figs = {"ablate.bars": figures.ablation_bars(self.table)}
        cells = self.table[self.table["scope"] == "cell"]
        if len(cells):
            mode = self.summary.get("mode", "")
            figs["ablate.grid"] = figures.layer_block_heatmap(
                cells, "accuracy", f"Accuracy with one (layer, block) {mode}-ablated"
            )
        return figs


@dataclass(repr=False)
class KnockoutResult(Result):
    """Accuracy with attention edges to / between blocks removed in every layer; `correct` holds
    the per-example outcomes [rows of the table, examples]."""

    correct: np.ndarray | None = None
    name: ClassVar[str] = "knockout"

    def accuracy(self, knockout: str = "none", block: int | None = None) -> Estimate:
        """Accuracy of one row (block None: the row without a block) with its Wilson interval."""
        t = self.table
        rows = (t["knockout"] == knockout) & (t["block"].isna() if block is None else t["block"] == block)
        return estimate_of(self.correct[int(np.flatnonzero(rows.to_numpy())[0])])

    def figures(self) -> dict[str, go.Figure]:
        return {"knockout.bars": figures.knockout_bars(self.table)}


@dataclass(repr=False)
class DecodeResult(Result):
    """Greedy answers under an intervention: per example its answer, whether it is right, and
    the log-prob of every token chosen (`logprobs`)."""

    logprobs: list[list[float]] = field(default_factory=list)
    name: ClassVar[str] = "decode"

    @property
    def answers(self) -> list[str]:
        return self.table["answer"].tolist()

    def accuracy(self) -> Estimate:
        return estimate_of(self.table["correct"].to_numpy())

    def figures(self) -> dict[str, go.Figure]:
        return {"decode.accuracy": figures.estimates({"accuracy": self.accuracy()}, "Greedy accuracy")}


@dataclass(repr=False)
class EffectResult(Result):
    """One example read out after every block k, intact and under an intervention: readouts,
    whether they are right, and the gold answer's log-prob."""

    name: ClassVar[str] = "effect"

    def figures(self) -> dict[str, go.Figure]:
        return {"effect.bars": figures.intervention_effect(self.table)}
