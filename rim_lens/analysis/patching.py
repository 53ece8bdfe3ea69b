"""Activation patching: clean block states patched into minimally corrupted runs.

Pairs differ in one operand (`make_pairs`); the metric is the logit difference between the clean
and the corrupt answer token where they first differ (`logit_diff`). `patch` runs one cell per
(layer, block[, slot]) and the sets `ablate` scopes: `exact` skips the work a patch leaves
unchanged (`engine.resume_sweep`, hf backend), `full` runs every row as a whole pass (any
backend; the same numbers). Attribution patching (`attribution`) estimates the same table from
gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from rim_lens.analysis import figures
from rim_lens.analysis.backends import HFBackend
from rim_lens.analysis.engine import Variant, resume_sweep, sweep
from rim_lens.analysis.interventions import Intervention, Patch
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, Site
from rim_lens.artefacts import PATCH_METHODS
from rim_lens.data.examples import Example
from rim_lens.errors import DataError, RunError
from rim_lens.model.layouts import Batch, Layout, SequenceBuilder
from rim_lens.stats import Estimate, bootstrap


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


def make_pairs(lab: Session, examples: Sequence[Example] | None = None, seed: int = 0) -> Pairs:
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


def given_pairs(lab: Session, pairs: Sequence[tuple[Example | str, Example | str]]) -> Pairs:
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


def patch_method(lab: Session, method: str | None) -> str:
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
    lab: Session,
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
    intervention = lab.fit(Patch(from_=pairs.clean), pairs.corrupt, sel)
    cells, variants = _cells(sel, per_slot, intervention)
    sets = patch_sets(sel)
    variants += [Variant(sites, intervention) for _, sites in sets]
    clean, out = _logit_diffs(lab, pairs, variants, max_rows, method)
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


def _logit_diffs(
    lab: Session, pairs: Pairs, variants: list[Variant], max_rows: int, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit differences of the clean runs [P] and of the corrupt runs, intact and under each
    variant [1 + variants, P], the latter by `method` ("exact": resumed, else whole passes)."""
    metric = logit_diff(pairs)
    clean = sweep(lab.backend, lab.builder, pairs.prompts(lab.builder, "clean"), [Variant()], metric)[0]
    seqs, every = pairs.prompts(lab.builder), [Variant(), *variants]
    if method == "exact":  # the metric reads the last position only
        return clean, resume_sweep(lab.backend, lab.builder, seqs, every, metric, max_rows, last_only=True)
    return clean, sweep(lab.backend, lab.builder, seqs, every, metric, max_rows)


def _cells(sel: Selection, per_slot: bool, intervention: Intervention) -> tuple[list[dict], list[Variant]]:
    """The cells patched one at a time, (layer, block) or with `per_slot` (layer, block, slot),
    and the variant patching each."""
    if per_slot:
        cells = [dict(layer=l, block=k, slot=j) for l in sel.layers for k in sel.blocks for j in sel.slots]
        return cells, [Variant([Site(**c)], intervention) for c in cells]
    cells = [dict(layer=l, block=k) for l in sel.layers for k in sel.blocks]
    return cells, [Variant(sel.sites(blocks=[c["block"]], layers=[c["layer"]]), intervention) for c in cells]


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


@dataclass(repr=False)
class PatchResult(Result):
    """The patching grid: mean logit difference and recovery per (layer, block[, slot]); the
    per-pair logit differences clean [P], corrupt [P] and patched [cells, P] give intervals."""

    clean: np.ndarray | None = None
    corrupt: np.ndarray | None = None
    patched: np.ndarray | None = None
    sets: pd.DataFrame | None = None  # sets of sites patched together (`patch_sets`)
    set_patched: np.ndarray | None = None  # [sets, P]
    changed: list[tuple[int, ...]] = field(default_factory=list)  # per pair, the steps it changes
    name: ClassVar[str] = "patch"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {self.name: self.table, **({"patch_sets": self.sets} if self.sets is not None else {})}

    def recovery(
        self, cell: int, pairs: np.ndarray | None = None, patched: np.ndarray | None = None
    ) -> Estimate:
        """Recovery of one cell (or, with `patched` = `set_patched`, one set of sites),
        (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) in means over `pairs` (default all),
        with a bootstrap interval over those pairs."""
        pairs = np.arange(len(self.clean)) if pairs is None else np.asarray(pairs, dtype=int)
        patched = self.patched if patched is None else patched
        if not len(pairs):
            return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap")

        def stat(idx: np.ndarray) -> np.ndarray:  # [resamples, pairs] -> [resamples]
            i = pairs[idx.astype(int)]
            corrupt = self.corrupt[i].mean(-1)
            gap = self.clean[i].mean(-1) - corrupt
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(gap != 0, (patched[cell, i].mean(-1) - corrupt) / gap, math.nan)

        return bootstrap(np.arange(len(pairs)), statistic=stat, vectorized=True)

    def _set(self, scope: str, layer: int | None = None, block: int | None = None) -> int | None:
        t = self.sets
        hit = (t["scope"] == scope) & (t["layer"].isna() if layer is None else t["layer"] == layer)
        hit &= t["block"].isna() if block is None else t["block"] == block
        found = np.flatnonzero(hit.to_numpy())
        return int(found[0]) if len(found) else None

    def carried(self, select_on: np.ndarray | None = None, score_on: np.ndarray | None = None) -> dict:
        """Do the blocks carry it: the layer at which patching every block recovers most on the pairs
        `select_on`, and that recovery on the pairs `score_on` (bootstrap interval)."""
        if self.sets is None or self.set_patched is None:
            return {}
        select = np.arange(len(self.clean)) if select_on is None else np.asarray(select_on, dtype=int)
        gap = self.clean[select].mean() - self.corrupt[select].mean()
        layers = [(i, int(r["layer"])) for i, r in self.sets.iterrows() if r["scope"] == "layer"]
        if not gap or not layers:
            return {}
        recovery = [
            (self.set_patched[i, select].mean() - self.corrupt[select].mean()) / gap for i, _ in layers
        ]
        i, layer = layers[int(np.nanargmax(recovery))]
        return {"layer": layer, "recovery": self.recovery(i, score_on, self.set_patched)}

    def grounding(self, step: int) -> dict[int, Estimate]:
        """On the pairs that change step `step`'s value only, each block's recovery when patched at
        every layer (bootstrap intervals), by block; empty without such pairs."""
        pairs = np.array([i for i, c in enumerate(self.changed) if c == (step,)], dtype=int)
        if self.sets is None or not len(pairs):
            return {}
        blocks = [(i, int(r["block"])) for i, r in self.sets.iterrows() if r["scope"] == "block"]
        return {k: self.recovery(i, pairs, self.set_patched) for i, k in blocks}

    def peak(self, select_on: np.ndarray | None = None, score_on: np.ndarray | None = None) -> dict:
        """The cell with the highest recovery on the pairs `select_on`, and its recovery on the
        pairs `score_on` with a bootstrap interval (defaults: all pairs, which is optimistic: the
        maximum of a grid, scored where it was chosen)."""
        select = np.arange(len(self.clean)) if select_on is None else np.asarray(select_on, dtype=int)
        gap = self.clean[select].mean() - self.corrupt[select].mean()
        recovery = (self.patched[:, select].mean(1) - self.corrupt[select].mean()) / gap if gap else None
        if recovery is None or not np.isfinite(recovery).any():
            return {}
        cell = int(np.nanargmax(recovery))
        row = self.table.iloc[cell]
        where = {k: int(row[k]) for k in ("layer", "block", "slot") if k in row}
        return {**where, "recovery": self.recovery(cell, score_on)}

    def figures(self) -> dict[str, go.Figure]:
        return {
            "patch.heatmap": figures.layer_block_heatmap(
                self.table, "recovery", "Patching: recovery of the clean answer", zmid=0
            )
        }
