"""Interchange interventions: example B run with example A's block states. Does B's output become
A's answer (graded: the changed rate, the log-prob gain, the donor's tokens), and does a block carry
the value of a step (matched versus unmatched values)?
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rim_lens.analysis import figures
from rim_lens.analysis.causal import decode_texts
from rim_lens.analysis.engine import Variant, score
from rim_lens.analysis.interventions import Patch
from rim_lens.analysis.results import Result, estimate_of, with_intervals
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection
from rim_lens.data.examples import Example
from rim_lens.errors import RimLensError, RunError
from rim_lens.stats import Estimate, bootstrap, proportion


# -- interchange ---------------------------------------------------------------------------------------
def interchange(lab: Session, sel: Selection, seed: int = 0, grid: bool = True) -> InterchangeResult:
    """Give example B the block states of example A (pairs with different answers), at one
    layer or all selected layers and one block or all selected blocks. Reports how often the
    output becomes A's answer (`to_A`), stays B's, or is neither, how often it becomes what the
    model outputs for A (`to_A_output`), and, graded, how often it changes from what the model
    outputs for B (`changed`), how far A's answer's log-prob rises (`logprob_gain`), and, with
    every block swapped, the share of answer tokens that take A's output's value where A's and
    B's outputs differ (`summary["donor_tokens"]`). Then the matched/unmatched-value interchange
    per step (`value_interchange`)."""
    examples = lab.examples
    pairs = _answer_pairs(examples, seed)
    A = [examples[a] for a, _ in pairs]
    B = [examples[b] for _, b in pairs]
    swap = lab.fit(Patch(from_=A), B, sel)
    cells = _swaps(sel, grid)
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
    result.summary = _summary(result)
    result.record = lab.record("interchange", sel, swap, seed=seed, grid=grid, pairs=len(pairs))
    return result


def _answer_pairs(examples: Sequence[Example], seed: int) -> list[tuple[int, int]]:
    """(A, B) index pairs of the examples, shuffled and paired off, where A's answer differs from B's."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pairs = [(a, b) for a, b in zip(order[::2], order[1::2]) if examples[a].answer != examples[b].answer]
    if not pairs:
        raise RunError("interchange needs examples with different answers")
    return pairs


def _swaps(sel: Selection, grid: bool) -> list[dict]:
    """What is swapped, as table rows: nothing, everything selected and, with `grid`, each block,
    each layer and each (layer, block) cell (layer / block None: every selected one at once)."""
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
    return cells


def _summary(result: InterchangeResult) -> dict:
    """The headline figures: with every selected block swapped, and intact."""
    table, row = result.table, result.table.iloc[result._row("all")]
    return {
        "transfer_rate": float(row["to_A"]),
        "transfer": result.transfer("all"),
        "stays_B": float(row["stays_B"]),
        "neither": float(row["neither"]),
        "changed": result.changed_rate("all"),
        "logprob_gain": result.gain("all"),
        "donor_tokens": result.donor_share(),
        "intact_B_correct": float(table[table["swap"] == "none"].iloc[0]["stays_B"]),
        "pairs": len(result.pairs),
    }


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


def value_interchange(lab: Session, sel: Selection, seed: int = 0) -> pd.DataFrame:
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


@dataclass(repr=False)
class InterchangeResult(Result):
    """B given A's block states: how often B's output becomes A's answer, stays B's or neither.
    `to_a` holds the per-pair outcomes [rows of the table, pairs]; `pairs` the (A, B) indices."""

    to_a: np.ndarray | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    changed: np.ndarray | None = None  # [rows, pairs]: B's output is no longer what it was
    logprob_gain: np.ndarray | None = None  # [rows, pairs]: A's answer's log-prob, swapped - intact
    donor_tokens: np.ndarray | None = None  # [pairs]: every block swapped (`donor_tokens`)
    values: pd.DataFrame | None = None  # the matched/unmatched-value interchange (`value_interchange`)
    name: ClassVar[str] = "interchange"

    def tables(self) -> dict[str, pd.DataFrame]:
        values = self.values if self.values is not None and len(self.values) else None
        return {self.name: self.table, **({"interchange_values": values} if values is not None else {})}

    def _row(self, swap: str) -> int:
        return int(np.flatnonzero(self.table["swap"].to_numpy() == swap)[0])

    def transfer(self, swap: str = "all") -> Estimate:
        """The rate at which B's output becomes A's answer, with its Wilson interval over pairs."""
        return estimate_of(self.to_a[self._row(swap)])

    def changed_rate(self, swap: str = "all") -> Estimate:
        """The rate at which B's output changes from what it was, with its Wilson interval."""
        return estimate_of(self.changed[self._row(swap)])

    def gain(self, swap: str = "all") -> Estimate:
        """The mean rise in A's answer's log-prob (nats), with a bootstrap interval over pairs."""
        return bootstrap(self.logprob_gain[self._row(swap)])

    def donor_share(self) -> Estimate:
        """With every block swapped, the mean share of answer tokens that take the donor's value
        where the two outputs differ, with a bootstrap interval over those pairs."""
        found = self.donor_tokens[~np.isnan(self.donor_tokens)]
        return bootstrap(found)

    def value_rate(self, step: int, kind: str, block: int | None) -> Estimate | None:
        """The matched ("stays") or unmatched ("moves to the counterfactual") rate of one step at
        one block (None: every block), or None if not measured."""
        v = self.values
        if v is None or not len(v):
            return None
        hit = (
            (v["step"] == step)
            & (v["kind"] == kind)
            & (v["block"].isna() if block is None else v["block"] == block)
        )
        if not hit.any():
            return None
        r = v[hit].iloc[0]
        return Estimate(float(r["rate"]), float(r["rate_lo"]), float(r["rate_hi"]), int(r["n"]), "wilson")

    def figures(self) -> dict[str, go.Figure]:
        return {"interchange.matrix": figures.interchange_matrix(self.table)}
