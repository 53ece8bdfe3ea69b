"""Causal abstraction on memory blocks: does a block hold a chain-of-thought variable?

For a variable v of the task's causal model (`rim_lens.data.causal`: a partial product, a running
value, a step's result) and a site (layer, block, slot), an interchange intervention runs a base
question with the coordinates of its state at the site inside a subspace B set to those of a
source question's state there, h' = h_base + (h_source - h_base) B Bᵀ (TransformerLens'
`SubspaceInterchange`). The interchange-intervention accuracy (IIA) is the fraction of pairs whose
output then equals the causal model's counterfactual answer: the base's answer with v taken from
the source (Geiger et al.). Outputs are scored teacher-forced, which is exactly greedy decoding
(`engine`).

Subspaces ("bases"), each at every site it is used at:

    probe          the top-r directions of a value probe's weights (`probes.LinearProbe`)
    das            learned by distributed alignment search on training pairs (TL `fit_das`)
    random         a seeded random subspace (TL `random_basis`)
    full           the whole state (a `Patch`): full interchange at one site, to screen sites

Controls, trained and scored exactly like the real thing (same pairs, rank, budget, seed):

    placebo        a random subspace moving each state exactly as far as the real basis does (TL
                   `NormMatchedPlacebo`): an effect it shares comes from the size of the move
    das_arbitrary  DAS on arbitrary targets: the variable's values relabelled by a fixed random map
                   (TL `arbitrary_targets`), the causal model otherwise intact
    das_untrained  DAS on an untrained copy of the model (`untrained_copy`)
    the pause model: the same analysis at the same sites (`sites=`); `report` runs it

Pairs. Bases and sources are examples the intact model answers correctly. The examples are split
by the task's canonical key: DAS is fitted, probes are fitted, and sites and slots are chosen on
pairs within the training part (a `verdict.SELECT_FRACTION` share of the keys); IIA is scored on
pairs within the other part (Wilson intervals over pairs; a base or source example serves in a few
pairs, so the intervals are somewhat narrower than independent pairs would give). Pairs whose
counterfactual answer equals the base's answer are uninformative (no intervention is needed to
"succeed") and are left out; the summary reports what share of pairs they were.

Defaults (the module's constants; the report uses them): `PAIRS` pairs per part and variable, at
most `ceil(PAIRS / bases)` per base example. Every site is screened with the full state on half
the training pairs. The map fits the probe basis (rank 1) at each (layer, block)'s slot most
promising there and scores it and its placebo on held-out pairs. DAS (rank 1;
`DAS_EPOCHS` epochs of `DAS_BATCH` pairs, Adam at `DAS_LR`) is fitted at the `DAS_SITES` most
promising sites (by IIA in screening, then by how far the interchange raises the counterfactual
answer's log-prob, among sites whose state varies with the question); the best of them on the
training pairs gets the placebo, arbitrary-target and untrained controls.

TransformerLens' interchange functions take a model with hook points and one position per
example. `_SiteModel` presents one (layer, block, slot) site of a session that way: its hook
point's activation is the [batch, d_model] state at the site, its inputs index prompts that the
session's backend lays out and runs (with gradients, for `fit_das`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from threadpoolctl import threadpool_limits
from transformer_lens.tools.analysis.interchange import (
    LearnedSubspace,
    NormMatchedPlacebo,
    SubspaceInterchange,
    arbitrary_targets,
    collect_activations,
    fit_das,
    random_basis,
    run_with_intervention,
)
from transformer_lens.tools.analysis.projection_kernel import orthonormal_subspace
from transformers import PreTrainedModel

from rim_lens.analysis import figures, probes, verdict
from rim_lens.analysis.backends import Edit, make_backend
from rim_lens.analysis.engine import Variant, score
from rim_lens.analysis.interventions import Patch
from rim_lens.analysis.results import Result, with_intervals
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import BlockStates, Selection, Site, block_index
from rim_lens.artefacts import ABSTRACTION_BASES
from rim_lens.data.causal import CausalModel, Variable
from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.model.layouts import Layout, block_positions
from rim_lens.stats import Estimate

# -- the analysis' choices, in one place ----------------------------------------------------------
PAIRS = 128  # pairs per part (training, held-out) and variable
DAS_SITES = 2  # sites per variable DAS is fitted at: the most promising on training pairs
# 80 Adam steps of 16 pairs: on the hand-built model as close to the stored direction as fit_das'
# own 20 epochs at 32 pairs a step, at half the cost (a DAS step is a forward and backward pass).
DAS_EPOCHS = 10
DAS_BATCH = 16
DAS_LR = 1e-2  # Adam, as TransformerLens' fit_das
# The report's capacity: ranks swept (the best chosen on training pairs; a unit stops its sweep once
# a rank reaches FULL_IIA there) over a joint unit (`joint_unit`) instead of single sites.
RANKS = (1, 2, 4, 8, 16)
FULL_IIA = 0.99
UNDERFIT = 0.1  # "DAS under-fit": its training IIA this far below the full state's at the same sites
# Basis names as the table writes them.
PROBE, DAS, RANDOM, FULL, PLACEBO = "probe", "das", "random", "full", "placebo"
DAS_PLACEBO, DAS_ARBITRARY, DAS_UNTRAINED = "das_placebo", "das_arbitrary", "das_untrained"
DAS_FULL = "das_full"  # the whole state at the best DAS unit
# The controls of the best DAS site, as the summary names them.
CONTROLS = {"placebo": DAS_PLACEBO, "arbitrary": DAS_ARBITRARY, "untrained": DAS_UNTRAINED}


# -- pairs ----------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """(base, source) example indices with the counterfactual answer of each pair; `candidates`
    and `informative` count the ordered pairs considered and those whose counterfactual answer
    differs from the base's answer."""

    base: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    candidates: int = 0
    informative: int = 0

    def __len__(self) -> int:
        return len(self.base)

    def keep(self, rows: Sequence[int], answers: Sequence[str] | None = None) -> Pairs:
        """The pairs `rows` (with other counterfactual answers, e.g. arbitrary targets)."""
        answers = [self.answers[i] for i in rows] if answers is None else list(answers)
        return Pairs([self.base[i] for i in rows], [self.source[i] for i in rows], answers)


def split_examples(lab: Session, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the session's examples in the training part and the held-out part, split by the
    task's canonical key (a `verdict.SELECT_FRACTION` share of the keys for training)."""
    keys = [lab.task.key(ex.question) for ex in lab.examples]
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    train = set(unique[: int(round(len(unique) * verdict.SELECT_FRACTION))])
    chosen = np.array([k in train for k in keys])
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def make_pairs(
    lab: Session, model: CausalModel, name: str, idx: Sequence[int], n: int = PAIRS, seed: int = 0
) -> Pairs:
    """Up to `n` informative pairs among the examples `idx`: each base with up to ceil(n / bases)
    sources (other questions), such that the counterfactual answer is defined, differs from the
    base's answer and can be written in the tokenizer's vocabulary."""
    rng = random.Random(seed)
    examples, unk = lab.examples, lab.tokenizer.unk_token_id
    informative: dict[int, list[tuple[int, str]]] = {}
    pairs = Pairs()
    for b in idx:
        base = examples[b]
        for s in idx:
            if examples[s].question == base.question:
                continue
            pairs.candidates += 1
            answer = model.counterfactual(base, examples[s], name)
            if answer is None or lab.task.answers_match(answer, base.answer):
                continue
            if unk is not None and unk in lab.builder.encode(answer):
                continue
            pairs.informative += 1
            informative.setdefault(b, []).append((s, answer))
    bases = sorted(informative)
    rng.shuffle(bases)
    per_base = math.ceil(n / max(len(bases), 1))
    for b in bases:
        for s, answer in rng.sample(informative[b], min(per_base, len(informative[b]))):
            pairs.base.append(b)
            pairs.source.append(s)
            pairs.answers.append(answer)
    keep = sorted(rng.sample(range(len(pairs)), min(n, len(pairs))))
    kept = pairs.keep(keep)
    kept.candidates, kept.informative = pairs.candidates, pairs.informative
    return kept


def arbitrary_answers(
    lab: Session, model: CausalModel, name: str, pairs: Pairs, seed: int = 0
) -> tuple[list[int], list[str]]:
    """The arbitrary-target control's pairs and answers: the base's answer with the variable set
    to a fixed pseudo-random relabelling of the source's value (TL `arbitrary_targets`, keyed by
    that value, over the values the variable takes in the session); pairs where that answer is
    undefined or the base's own are left out."""
    values = [model.values(ex).get(name) for ex in lab.examples]
    pool = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    keys = [repr(model.values(lab.examples[s])[name]) for s in pairs.source]
    drawn = arbitrary_targets(keys, len(pool), seed).tolist()
    rows, answers = [], []
    for i, (b, c) in enumerate(zip(pairs.base, drawn)):
        answer = model.intervene(lab.examples[b], name, pool[c])
        if answer is not None and not lab.task.answers_match(answer, lab.examples[b].answer):
            rows.append(i)
            answers.append(answer)
    return rows, answers


# -- the intervention -----------------------------------------------------------------------------
SiteBases = Mapping[Site, torch.Tensor | None]  # None: the whole state


def _site_bases(value) -> dict[Site, torch.Tensor]:
    """Bases by site, from a mapping or from `to_dict`'s list of [layer, block, slot, basis]."""
    if isinstance(value, Mapping):
        return {Site(*site): torch.as_tensor(b, dtype=torch.float32) for site, b in value.items()}
    return {Site(*item[:3]): torch.as_tensor(item[3], dtype=torch.float32) for item in value or []}


class Interchange(Patch):
    """Set the coordinates of each target's state inside a subspace to its source's (TL
    `SubspaceInterchange`): `bases` maps a site to its orthonormal basis [d_model, rank]. With
    `matched`, the norm-matched random placebo (TL `NormMatchedPlacebo`): move along `bases[site]`
    exactly as far as interchanging along `matched[site]` would. `from_` gives one source per
    target, as for `Patch`."""

    kind = "subspace_interchange"

    def __init__(self, from_, bases=None, matched=None) -> None:
        super().__init__(from_)
        self.bases, self.matched = _site_bases(bases), _site_bases(matched)

    def params(self) -> dict:
        def listed(bases):
            return [[*site, b.tolist()] for site, b in bases.items()]

        return {**super().params(), "bases": listed(self.bases), "matched": listed(self.matched)}

    def __call__(self, base, site, rows):
        source = super().__call__(base, site, rows).to(base.dtype)
        step = SubspaceInterchange(self.bases[site])
        if site in self.matched:
            step = NormMatchedPlacebo(SubspaceInterchange(self.matched[site]), self.bases[site])
        return step(base, source)


# A unit DAS is fitted at: one site, or a group of sites at one layer interchanged jointly (one basis
# over their concatenated states).
Unit = Site | tuple[Site, ...]


def unit_sites(unit: Unit) -> tuple[Site, ...]:
    """The sites of a unit."""
    return (unit,) if isinstance(unit, Site) else tuple(unit)


def unit_label(unit: Unit) -> str:
    """How tables name a unit: `layer 1, block 2, slot 1`, or `layer 1, blocks 1-2, every slot`."""
    if isinstance(unit, Site):
        return f"layer {unit.layer}, block {unit.block}, slot {unit.slot}"
    blocks = sorted({s.block for s in unit})
    span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
    return f"layer {unit[0].layer}, {span}, every slot"


def joint_unit(sel: Selection, layer: int, step: int | None) -> tuple[Site, ...]:
    """The joint unit of a variable at `layer`: every slot of blocks 1..step (a step's value can sit
    in its own block and be built up or copied in the ones before it; every block for a variable
    no step computes)."""
    last = sel.blocks[-1] if step is None else min(step, sel.blocks[-1])
    return tuple(sel.sites(blocks=[k for k in sel.blocks if k <= last], layers=[layer]))


class JointInterchange(Patch):
    """Interchange a subspace of the concatenated states of a group of sites at one layer: `basis`
    [n_sites * d_model, rank] over the group's states in `sites` order (TL `SubspaceInterchange`);
    with `matched`, the norm-matched random placebo. `from_`: one source per target, as `Patch`.
    The engine hands it every row's states at the group at once (`engine.Variant`)."""

    kind = "joint_subspace_interchange"
    joint = True

    def __init__(self, from_, sites, basis, matched=None) -> None:
        super().__init__(from_)
        self.sites = tuple(Site(*s) for s in sites)
        self.basis = torch.as_tensor(basis, dtype=torch.float32)
        self.matched = None if matched is None else torch.as_tensor(matched, dtype=torch.float32)

    def params(self) -> dict:
        matched = None if self.matched is None else self.matched.tolist()
        sites = [list(s) for s in self.sites]
        return {**super().params(), "sites": sites, "basis": self.basis.tolist(), "matched": matched}

    def __call__(self, base, sites, rows):
        source = torch.cat([Patch.__call__(self, base, site, rows) for site in sites], -1).to(base.dtype)
        step = SubspaceInterchange(self.basis)
        if self.matched is not None:
            step = NormMatchedPlacebo(SubspaceInterchange(self.matched), self.basis)
        return step(base, source)


@dataclass
class Outcome:
    """What an interchange did to each pair: whether the output became the counterfactual answer
    (`hits`), and how far the counterfactual answer's log-prob rose over the intact run (`gain`:
    graded where hits are rare)."""

    hits: np.ndarray
    gain: np.ndarray

    def promise(self) -> tuple[float, float]:
        """How promising the site looks: IIA, then the mean gain."""
        return float(self.hits.mean()), float(self.gain.mean())


def iia(
    lab: Session, sel: Selection, pairs: Pairs, bases: Mapping, matched: Mapping | None = None
) -> dict[Unit, Outcome]:
    """Per unit of `bases` (a site, or a joint group of sites), what interchanging along
    `bases[unit]` does to each pair (a basis None: the whole state, a `Patch`), in one sweep with
    the intact run."""
    sources = [lab.examples[s] for s in pairs.source]
    targets = [lab.examples[b] for b in pairs.base]
    matched = matched or {}
    units = list(bases)
    single = {u: b for u, b in bases.items() if isinstance(u, Site) and b is not None}
    swaps = {}
    if any(b is None for b in bases.values()):
        whole = lab.fit(Patch(from_=sources), targets, sel)
        swaps.update({u: whole for u, b in bases.items() if b is None})
    if single:
        mine = {u: b for u, b in matched.items() if u in single}
        one = lab.fit(Interchange(sources, single, mine), targets, sel)
        swaps.update(dict.fromkeys(single, one))
    for u, b in bases.items():
        if b is not None and not isinstance(u, Site):
            swaps[u] = lab.fit(JointInterchange(sources, u, b, matched.get(u)), targets, sel)
    variants = [Variant(), *(Variant(list(unit_sites(u)), swaps[u]) for u in units)]
    hits, logprob = score(lab.backend, lab.builder, targets, variants, pairs.answers)
    gain = (logprob[1:] - logprob[0]).numpy()
    return {u: Outcome(h.numpy(), g) for u, h, g in zip(units, hits[1:], gain)}


# -- bases ----------------------------------------------------------------------------------------
def probe_directions(states: np.ndarray, values: Sequence, rank: int) -> tuple[torch.Tensor | None, str]:
    """The top `rank` directions, in activation space, of a value probe's weights fitted on
    `states` [n, d_model] (the weights divided by the scaler's scale, centred over classes; for
    values probed digit by digit, every digit's weights together), and a note; None if the probe
    has no direction (the states or the values do not vary).

    TL's `probe_basis` computes this basis but asks for rank n_classes - 1, which fails whenever
    the weights span fewer directions (ten classes read off one direction); the basis it would
    return is `orthonormal_subspace` of the centred weights at their measured rank."""
    _, columns, note = probes.value_columns(list(values))
    rows = []
    with threadpool_limits(1):  # see probes.oof_proba
        for y in columns:
            probe = probes.LinearProbe().fit(states, y)
            if probe.pipeline_ is None:
                continue
            scaler, model = probe.pipeline_[0], probe.pipeline_[-1]
            w = model.coef_ / scaler.scale_
            # A binary probe has one row; as two centred rows it spans the same direction.
            rows.append(np.concatenate([-w / 2, w / 2]) if len(w) == 1 else w - w.mean(0))
    if not rows:
        return None, note or "one class"
    try:
        basis = orthonormal_subspace(torch.tensor(np.concatenate(rows), dtype=torch.float32).T).basis
    except ValueError:  # the weights vanish: the states do not vary with the values
        return None, "the probe's weights vanish (the states do not vary)"
    return basis[:, :rank], ""


def random_directions(d_model: int, rank: int, site: Site, seed: int) -> torch.Tensor:
    """A seeded random orthonormal basis, its own for every site (TL `random_basis`)."""
    return random_basis(d_model, rank, seed=int(np.random.SeedSequence([seed, *site]).generate_state(1)[0]))


def untrained_copy(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """A copy of `model`'s architecture with the architecture's own initialisation and no training:
    the random-init control. Built as TL's `random_init_bridge` builds its model (the class from its
    config, seeded), but kept as the plain model every backend here wraps; TL's `reinitialized`
    cannot serve, since GPT-2's Conv1D layers have no `reset_parameters`."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        copy = type(model)(model.config)
    return copy.eval()


class _SiteModel:
    """One (layer, block, slot) site of a session as TL's interchange functions see a model: one
    hook point, `HOOK`, whose activation is the [batch, d_model] state at the site (one position per
    example); inputs are indices into `layouts`; `task_logits` runs them through the session's
    backend, with gradients, and returns the logits at the last `width` positions (where the
    answer is teacher-forced) as [batch, vocab, width], for cross-entropy against [batch, width]
    target tokens."""

    HOOK = "site"

    def __init__(self, lab: Session, layouts: Sequence[Layout], unit: Unit, width: int) -> None:
        self.original_model = lab.backend.model  # what TL checks is in evaluation mode
        self.lab, self.layouts, self.sites, self.width = lab, list(layouts), unit_sites(unit), width
        self._hooks: list = []

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.original_model.parameters()

    def requires_grad_(self, flag: bool) -> _SiteModel:
        self.original_model.requires_grad_(flag)
        return self

    @contextmanager
    def hooks(self, fwd_hooks):
        self._hooks = [fn for _, fn in fwd_hooks]
        try:
            yield self
        finally:
            self._hooks = []

    def reaches_output(self) -> bool:
        """Whether the state at the site can change the answer logits (of the first input)."""
        shift = torch.zeros(self.lab.backend.d_model * len(self.sites), requires_grad=True)
        with torch.enable_grad(), self.hooks([(self.HOOK, lambda act, hook: act + shift)]):
            return self.task_logits(torch.arange(1)).requires_grad

    def task_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        lab, sites, n = self.lab, self.sites, len(self.sites)
        batch = lab.builder.collate([self.layouts[i] for i in inputs.tolist()], side="left")
        rows = torch.arange(len(inputs))
        positions = block_positions(batch)[:, [block_index(s.block) for s in sites], [s.slot for s in sites]]

        def run(fn):
            def edit(states: torch.Tensor) -> torch.Tensor:  # [rows * n, d]: the sites' states, joined
                out = fn(states.reshape(len(rows), -1), None)
                return states if out is None else out.reshape(states.shape)

            return edit

        layer = sites[0].layer
        edits = {
            layer: [
                Edit(layer, rows.repeat_interleave(n), positions.flatten(), run(fn)) for fn in self._hooks
            ]
        }
        # Backend.forward runs without gradients; DAS needs them, so the backend's own pass is used.
        logits = lab.backend._forward(batch, [], edits, []).logits
        return logits[:, -self.width :].transpose(1, 2)


def das_directions(
    lab: Session, site: Unit, pairs: Pairs, rank: int, seed: int = 0, init: torch.Tensor | None = None
) -> torch.Tensor:
    """A rank-`rank` basis at `site` (or over a joint group's concatenated states) learned by DAS
    so that interchanging it turns each base's output into the pair's answer (cross-entropy on
    every answer token): TL `fit_das`, or, from the directions `init` (e.g. a value probe's,
    completed with seeded random directions), the same optimisation (TL's `LearnedSubspace`,
    `SubspaceInterchange` and Adam) started there."""
    based = [lab.builder.scored(lab.examples[b], a) for b, a in zip(pairs.base, pairs.answers)]
    sources = [lab.builder.prompt(lab.examples[s]) for s in pairs.source]
    width = max(len(lab.builder.encode(a)) + 1 for a in pairs.answers)
    hooked = _SiteModel(lab, based + sources, site, width)
    targets = torch.tensor([layout.targets[-width:] for layout in based])
    n = len(based)
    # Where the output does not depend on the site there is no gradient: DAS stays at its start.
    epochs = DAS_EPOCHS if hooked.reaches_output() else 0
    if init is None:
        found = fit_das(
            hooked, _SiteModel.HOOK, torch.arange(n), torch.arange(n, 2 * n), targets, hooked.task_logits,
            rank=rank, epochs=epochs, batch_size=DAS_BATCH, lr=DAS_LR, seed=seed,
        )  # fmt: skip
        return found.basis.float().cpu()
    return _das_from(hooked, n, targets, rank, epochs, seed, init)


def _das_from(
    hooked: _SiteModel, n: int, targets: torch.Tensor, rank: int, epochs: int, seed: int, init: torch.Tensor
) -> torch.Tensor:
    """`fit_das`'s optimisation (same loss, batches, optimiser and learning rate) started from the
    directions `init` [dim, <= rank], completed to `rank` with seeded random ones."""
    source = collect_activations(hooked, _SiteModel.HOOK, torch.arange(n, 2 * n), hooked.task_logits)
    dim = source.shape[1]
    extra = random_basis(dim, rank, seed=seed)
    start = orthonormal_subspace(torch.cat([init.float()[:, :rank], extra], 1)).basis[:, :rank]
    if start.shape[1] < rank:  # init and the random directions were dependent: redraw the rest
        start = torch.linalg.qr(torch.cat([start, random_basis(dim, rank, seed=seed + 1)], 1))[0][:, :rank]
    subspace = LearnedSubspace(dim, rank)
    subspace.proj.weight = start
    step = SubspaceInterchange(subspace)
    optimizer = torch.optim.Adam(subspace.parameters(), lr=DAS_LR)
    order = np.random.default_rng(seed)
    flags = [p.requires_grad for p in hooked.parameters()]
    hooked.requires_grad_(False)
    try:
        for _ in range(epochs):
            chosen = torch.as_tensor(order.permutation(n))
            for i in range(0, n, DAS_BATCH):
                idx = chosen[i : i + DAS_BATCH]
                optimizer.zero_grad()
                logits = run_with_intervention(
                    hooked, _SiteModel.HOOK, step, idx, source[idx], hooked.task_logits
                )
                loss = torch.nn.functional.cross_entropy(logits, targets[idx], reduction="sum") / len(idx)
                loss.backward()
                optimizer.step()
    finally:
        for p, flag in zip(hooked.parameters(), flags):
            p.requires_grad_(flag)
    return subspace.basis.detach().float().cpu()


# -- the analysis ---------------------------------------------------------------------------------
@dataclass
class _Variable:
    """One variable under analysis: its pairs, its table rows, and the units they are at."""

    var: Variable
    train: Pairs
    test: Pairs
    rows: list[dict] = field(default_factory=list)
    units: dict[str, Unit] = field(default_factory=dict)  # by `unit_label`

    def row(
        self, basis: str, site: Unit, rank: int, *, train: Outcome | None = None, test: Outcome | None = None,
        chosen: bool = False, note: str = "",
    ) -> dict:  # fmt: skip
        """Add a table row: IIA and mean log-prob gain on held-out pairs (`test`; IIA with its
        Wilson interval) and on training pairs (`train`); None: not scored there. A joint unit's row
        holds its layer, its last block and slot -1."""
        sites = unit_sites(site)
        label = unit_label(site)
        self.units[label] = site
        where = sites[0]._asdict() if isinstance(site, Site) else {
            "layer": sites[0].layer, "block": max(x.block for x in sites), "slot": -1
        }  # fmt: skip
        row = {"variable": self.var.name, "basis": basis, "rank": rank, **where, "unit": label}
        row.update(iia=np.nan, iia_lo=np.nan, iia_hi=np.nan, n=0, gain=np.nan)
        if test is not None:
            with_intervals([row], [test.hits], key="iia")
            row["n"], row["gain"] = len(test.hits), float(test.gain.mean())
        row["iia_train"], row["gain_train"] = train.promise() if train is not None else (np.nan, np.nan)
        row["n_train"] = 0 if train is None else len(train.hits)
        row["chosen"], row["note"] = chosen, note
        self.rows.append(row)
        return row

    def measure(
        self, lab: Session, sel: Selection, basis: str, site: Unit, directions: torch.Tensor | None, *,
        matched: torch.Tensor | None = None, pairs: tuple[Pairs, Pairs] | None = None, train: bool = True,
        chosen: bool = False, note: str = "",
    ) -> dict:  # fmt: skip
        """Score the interchange along `directions` (None: the whole state) at one unit on held-out
        pairs (and, if `train`, on training pairs; `pairs`: these two instead of the variable's
        own) and add its row."""
        train_pairs, test_pairs = pairs or (self.train, self.test)
        bases, match = {site: directions}, None if matched is None else {site: matched}
        on_train = iia(lab, sel, train_pairs, bases, match)[site] if train else None
        test = iia(lab, sel, test_pairs, bases, match)[site]
        rank = lab.backend.d_model * len(unit_sites(site)) if directions is None else directions.shape[1]
        return self.row(basis, site, rank, train=on_train, test=test, chosen=chosen, note=note)


def abstraction(
    lab: Session,
    sel: Selection,
    variable: str | Sequence[str] | None = None,
    method: str = "das",
    rank: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 1,
    sites: Sequence[Unit] | Mapping[str, Sequence[Unit]] | None = None,
    grid: bool = True,
    controls: bool = True,
    seed: int = 0,
    joint: bool = False,
) -> AbstractionResult:
    """IIA of the task's causal-model variables at memory-block sites (see the module docstring).

    `method`: "das" (the probe map, then DAS at the most promising sites or at `sites`, with its
    controls), "probe" (the probe map with its placebo) or "random" (the map along random
    subspaces). `rank`: one rank or several (DAS fits each, in increasing order, until one reaches
    `FULL_IIA` on training pairs; the map uses the lowest), or those of each variable by name.
    `sites`: units (a site, or a group of sites at one layer fitted jointly). `joint`: DAS jointly
    over `joint_unit` at the most promising site's layer (instead of at the `DAS_SITES` most
    promising sites). `grid`: score the map on held-out pairs at every (layer, block). `controls`:
    fit the arbitrary-target and untrained DAS controls. The best unit and rank (on training pairs)
    also gets the full state's IIA at the same sites.
    """
    if method not in ABSTRACTION_BASES:
        raise RunError(f"unknown abstraction method {method!r}; choose one of {', '.join(ABSTRACTION_BASES)}")
    checked = _ranks(rank, lab.backend.d_model)
    model = lab.task.causal_model()
    variables = _variables(model, lab.examples, variable)
    ranks = {v.name: checked[v.name] if isinstance(checked, Mapping) else checked for v in variables}
    fixed = _fixed_sites(lab, sites, variables)
    correct = score(lab.backend, lab.builder, lab.examples, [Variant()])[0][0].numpy()
    train_idx, test_idx = split_examples(lab, seed)
    states = lab.states(lab.examples, sel.layers)
    work, notes = [], {}
    for var in variables:
        train = make_pairs(lab, model, var.name, train_idx[correct[train_idx]], seed=seed)
        test = make_pairs(lab, model, var.name, test_idx[correct[test_idx]], seed=seed + 1)
        if not len(train) or not len(test):
            notes[var.name] = (
                f"no informative pairs among the {int(correct.sum())} examples the model answers "
                f"correctly ({len(train)} training, {len(test)} held-out)"
            )
        work.append(_Variable(var, train, test))
    for job in work:
        if job.var.name in notes:
            continue
        promise = {}
        if grid or fixed.get(job.var.name) is None:
            promise = _map(
                lab, sel, states, model, job, train_idx, method, ranks[job.var.name][0], grid, seed
            )
        chosen = fixed.get(job.var.name) or _promising(promise)
        if joint and chosen and job.var.name not in fixed:
            # The joint unit at the most promising site's layer: it holds that site, and a subspace
            # of one site's state is a subspace of the joint state too.
            step = job.var.step if job.var.kind != "answer" else None
            chosen = [joint_unit(sel, chosen[0].layer, step)]
        if method == DAS and chosen:
            _das(lab, sel, model, job, chosen, ranks[job.var.name], controls, seed)
        elif method == DAS:
            notes[job.var.name] = "no site's state varies with the question: nothing to interchange"
    table = pd.DataFrame([row for job in work for row in job.rows], columns=_COLUMNS)
    table = table.astype({"rank": "int64", "layer": "int64", "block": "int64", "slot": "int64"})
    pairs = pd.DataFrame(
        [
            {
                "variable": job.var.name,
                "part": part,
                "base": lab.examples[b].id,
                "source": lab.examples[s].id,
                "answer": answer,
            }
            for job in work
            for part, ps in (("train", job.train), ("test", job.test))
            for b, s, answer in zip(ps.base, ps.source, ps.answers)
        ],
        columns=["variable", "part", "base", "source", "answer"],
    )
    result = AbstractionResult(table, pairs=pairs)
    result.summary = {
        "method": method,
        "ranks": checked,
        "correct": int(correct.sum()),
        "n": len(lab.examples),
        "variables": {job.var.name: _best(job, notes.get(job.var.name, "")) for job in work},
    }
    result.record = lab.record(
        "abstraction",
        sel,
        None,
        variables=[v.name for v in variables],
        method=method,
        ranks=checked,
        sites={k: [_plain_unit(u) for u in v] for k, v in fixed.items()},
        joint=joint,
        grid=grid,
        controls=controls,
        seed=seed,
        pairs=PAIRS,
        das={
            "sites": DAS_SITES,
            "epochs": DAS_EPOCHS,
            "batch_size": DAS_BATCH,
            "lr": DAS_LR,
            "full_iia": FULL_IIA,
        },  # fmt: skip
    )
    return result


_COLUMNS = [
    "variable", "basis", "rank", "layer", "block", "slot", "unit", "iia", "iia_lo", "iia_hi", "n", "gain",
    "iia_train", "gain_train", "n_train", "chosen", "note",
]  # fmt: skip


def _ranks(rank, d_model: int) -> list[int] | dict[str, list[int]]:
    """Ranks checked and sorted: one rank or several, or (a mapping) those of each variable."""
    if isinstance(rank, Mapping):
        return {name: _ranks(r, d_model) for name, r in rank.items()}
    ranks = sorted({rank} if isinstance(rank, int) else set(rank))
    if not ranks or not all(1 <= r <= d_model for r in ranks):
        raise RunError(f"rank {ranks} out of range: ranks are 1..{d_model}")
    return ranks


def _plain_unit(unit: Unit) -> list:
    """A unit as JSON: [layer, block, slot], or a list of those for a joint group."""
    return list(unit) if isinstance(unit, Site) else [list(s) for s in unit]


def _unit(value) -> Unit:
    """A unit from `_plain_unit`'s form (or a Site / tuple of Sites)."""
    if isinstance(value, Site):
        return value
    if len(value) and isinstance(value[0], int | np.integer):
        return Site(*value)
    return tuple(Site(*s) for s in value)


def _variables(model: CausalModel, examples: Sequence[Example], wanted) -> list[Variable]:
    found = model.variables(examples)
    if wanted is None:
        return found
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    known = {v.name: v for v in found}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RunError(f"no variable {unknown[0]!r} in these examples; variables: {', '.join(known)}")
    return [known[n] for n in names]


def _fixed_sites(lab: Session, sites, variables: list[Variable]) -> dict[str, list[Unit]]:
    """Given units by variable name (a list: the same for every variable), each site checked."""
    if sites is None:
        return {}
    by_name = sites if isinstance(sites, Mapping) else {v.name: sites for v in variables}
    out = {}
    for name, chosen in by_name.items():
        out[name] = [_unit(u) for u in chosen]
        for unit in out[name]:
            for s in unit_sites(unit):
                lab.select([s.layer], [s.block], [s.slot])  # RunError naming the valid range
            if len({s.layer for s in unit_sites(unit)}) > 1:
                raise RunError("a joint unit's sites must share one layer")
    return out


def _map(
    lab: Session,
    sel: Selection,
    states: BlockStates,
    model: CausalModel,
    job: _Variable,
    train_idx: np.ndarray,
    method: str,
    rank: int,
    grid: bool,
    seed: int,
) -> dict[Site, tuple[float, float]]:
    """The map of one variable. Every site is screened with the full state on half the training
    pairs; per (layer, block) the slot most promising there is chosen, and the map basis (the
    probe, or random) is fitted and scored there on the training pairs and (with `grid`) on the
    held-out pairs, with its placebo. Returns how promising every site whose
    state varies with the question looks (an interchange elsewhere changes nothing)."""
    # Screening on every other training pair: half the cost, and still chosen in training.
    screen = job.train.keep(range(0, len(job.train), 2))
    full_train = iia(lab, sel, screen, dict.fromkeys(sel.sites()))
    varies = {s for s in full_train if float(states.at(*s).float().std(0).max()) > 1e-6}
    promise = {s: full_train[s].promise() for s in varies}
    chosen = {
        (l, k): max((Site(l, k, j) for j in sel.slots), key=lambda s: (full_train[s].promise(), -s.slot))
        for l in sel.layers
        for k in sel.blocks
    }
    sites = list(chosen.values())
    primary = RANDOM if method == RANDOM else PROBE
    bases, notes = _map_bases(states, model, job, lab.examples, train_idx, sites, primary, rank, seed)
    train = iia(lab, sel, job.train, bases)
    test = {}
    if grid:
        test[primary] = iia(lab, sel, job.test, bases)
        if primary == PROBE:
            placebo = {s: random_directions(states.d_model, bases[s].shape[1], s, seed + 1) for s in sites}
            test[PLACEBO] = iia(lab, sel, job.test, placebo, matched=bases)
    for site in sel.sites():
        picked = site in bases
        job.row(FULL, site, states.d_model, train=full_train[site], chosen=picked)
        if not picked:
            continue
        rank_here = bases[site].shape[1]
        job.row(
            primary,
            site,
            rank_here,
            train=train[site],
            test=test.get(primary, {}).get(site),
            chosen=True,
            note=notes[site],
        )
        if PLACEBO in test:
            note = f"norm-matched to {primary}"
            job.row(PLACEBO, site, rank_here, test=test[PLACEBO][site], chosen=True, note=note)
    return promise


def _map_bases(
    states: BlockStates, model: CausalModel, job: _Variable, examples: Sequence[Example],
    train_idx: np.ndarray, sites: list[Site], primary: str, rank: int, seed: int,
) -> tuple[dict[Site, torch.Tensor], dict[Site, str]]:  # fmt: skip
    """The map basis at each site, with a note where it is not what was asked: the probe's top
    `rank` directions (fitted on the training part's examples), or a random subspace."""
    values = [model.values(examples[i]).get(job.var.name) for i in train_idx]
    fitted = [i for i, v in zip(train_idx, values) if v is not None]
    labels = [v for v in values if v is not None]
    bases, notes = {}, {}
    for site in sites:
        basis, note = None, ""
        if primary == PROBE:
            basis, note = probe_directions(states.at(*site)[fitted].float().numpy(), labels, rank)
            if basis is not None and basis.shape[1] < rank:
                note = f"the probe spans rank {basis.shape[1]} only"
        if basis is None:
            basis = random_directions(states.d_model, rank, site, seed)
            note = f"{note}; a random basis stands in" if note else ""
        bases[site], notes[site] = basis, note
    return bases, notes


def _promising(promise: dict[Site, tuple[float, float]]) -> list[Site]:
    """The `DAS_SITES` most promising sites (IIA, then log-prob gain; ties: earlier sites)."""
    return sorted(promise, key=lambda s: (tuple(-x for x in promise[s]), s))[:DAS_SITES]


def _das(
    lab: Session, sel: Selection, model: CausalModel, job: _Variable, units: list[Unit], ranks: list[int],
    controls: bool, seed: int,
) -> None:  # fmt: skip
    """DAS at `units` for every rank (in increasing order, until one reaches `FULL_IIA` on training
    pairs); at the best (unit, rank) on training pairs, the full state's IIA at the same sites, its
    placebo and (with `controls`) the arbitrary-target and untrained-copy controls."""
    fitted = {}
    for unit in units:
        for r in ranks:
            if r > lab.backend.d_model * len(unit_sites(unit)):
                break
            fitted[(unit, r)] = das_directions(lab, unit, job.train, r, seed)
            if job.measure(lab, sel, DAS, unit, fitted[(unit, r)])["iia_train"] >= FULL_IIA:
                break
    best = max(
        (row for row in job.rows if row["basis"] == DAS),
        key=lambda row: (row["iia_train"], row["gain_train"], -row["rank"]),
    )
    best["chosen"] = True
    unit, r = job.units[best["unit"]], best["rank"]
    width = lab.backend.d_model * len(unit_sites(unit))
    job.measure(lab, sel, DAS_FULL, unit, None, chosen=True, note="the whole state at the same sites")
    placebo = random_directions(width, r, unit_sites(unit)[0], seed + 1)
    job.measure(
        lab, sel, DAS_PLACEBO, unit, placebo, matched=fitted[(unit, r)], train=False, chosen=True,
        note="norm-matched to das",
    )  # fmt: skip
    if not controls:
        return
    train_rows, train_answers = arbitrary_answers(lab, model, job.var.name, job.train, seed)
    test_rows, test_answers = arbitrary_answers(lab, model, job.var.name, job.test, seed)
    if train_rows and test_rows:
        pairs = job.train.keep(train_rows, train_answers), job.test.keep(test_rows, test_answers)
        arbitrary = das_directions(lab, unit, pairs[0], r, seed)
        note = "targets: the variable's values relabelled arbitrarily"
        job.measure(lab, sel, DAS_ARBITRARY, unit, arbitrary, pairs=pairs, chosen=True, note=note)
    untrained = _untrained_lab(lab, seed)
    basis = das_directions(untrained, unit, job.train, r, seed)
    job.measure(
        untrained, sel, DAS_UNTRAINED, unit, basis, chosen=True, note="an untrained copy of the model"
    )


def _untrained_lab(lab: Session, seed: int) -> Session:
    """The session over an untrained copy of its model (same backend, examples and layouts)."""
    copy = untrained_copy(lab.model, seed)
    backend = make_backend(lab.backend.name, copy, lab.tokenizer, lab.backend.model_dir)
    return type(lab)(copy, lab.tokenizer, lab.spec, lab.task, lab.examples, backend, source=lab.source)


def _best(job: _Variable, note: str) -> dict:
    """The summary of one variable: its best unit (chosen on training pairs) with its held-out IIA,
    its controls' at the same unit and rank, the full state's there (`full`, and on training pairs
    `full_train`: DAS "under-fit" when its training IIA is more than `UNDERFIT` below it), and the
    mean log-prob gain of each (`gain`)."""
    var = job.var
    entry = {
        "label": var.label,
        "kind": var.kind,
        "step": var.step,
        "pairs_train": len(job.train),
        "pairs_test": len(job.test),
        "informative": _share(job),
        "site": None,
        "unit": None,
        "group": None,
        "basis": None,
        "rank": None,
        "iia": None,
        "iia_train": None,
        **{name: None for name in CONTROLS},
        "full": None,
        "full_train": None,
        "underfit": False,
        "gain": {},
        "note": note,
    }
    rows = [r for r in job.rows if r["chosen"] and r["basis"] in (DAS, PROBE, RANDOM) and r["n"]]
    if not rows:
        return entry
    das = [r for r in rows if r["basis"] == DAS]
    best = max(das or rows, key=_better)
    unit = job.units[best["unit"]]
    entry.update(
        site={k: int(best[k]) for k in ("layer", "block", "slot")},
        unit=best["unit"],
        group=None if isinstance(unit, Site) else _plain_unit(unit),
        basis=best["basis"],
        rank=int(best["rank"]),
        iia=_estimate(best),
        iia_train=float(best["iia_train"]),
        gain={"iia": float(best["gain"])},
    )
    controls = {v: k for k, v in CONTROLS.items()}
    if best["basis"] == PROBE:
        controls = {PLACEBO: "placebo"}
    for row in job.rows:
        here = row["unit"] == best["unit"] and row["n"]
        if row["basis"] in controls and here and row["rank"] == best["rank"]:
            entry[controls[row["basis"]]] = _estimate(row)
            entry["gain"][controls[row["basis"]]] = float(row["gain"])
        if row["basis"] == DAS_FULL and here:
            entry["full"], entry["full_train"] = _estimate(row), float(row["iia_train"])
    if entry["full_train"] is not None:
        entry["underfit"] = bool(entry["iia_train"] < entry["full_train"] - UNDERFIT)
    return entry


def _better(row: dict) -> tuple:
    """How a best row is chosen: IIA on training pairs, then log-prob gain, then the lower rank."""
    return row["iia_train"], row["gain_train"], -row["rank"]


def _share(job: _Variable) -> float | None:
    """The share of candidate pairs (both parts) whose counterfactual answer differs from the base's."""
    candidates = job.train.candidates + job.test.candidates
    return (job.train.informative + job.test.informative) / candidates if candidates else None


def _estimate(row: dict) -> Estimate:
    return Estimate(float(row["iia"]), float(row["iia_lo"]), float(row["iia_hi"]), int(row["n"]), "wilson")


# -- the result -----------------------------------------------------------------------------------
@dataclass(repr=False)
class AbstractionResult(Result):
    """IIA per variable, basis, rank and site (`table`: `iia` on held-out pairs with its Wilson
    interval, `iia_train` on training pairs, `chosen` marking the slot of each (layer, block) in
    the map and the best DAS site with its controls), the pairs used (`pairs`), and per variable
    its best site with its controls (`summary["variables"]`, see `best`)."""

    pairs: pd.DataFrame | None = None
    name: ClassVar[str] = "abstraction"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"abstraction": self.table, "abstraction_pairs": self.pairs}

    def best(self, variable: str) -> dict:
        """One variable's best site (chosen on training pairs): site, basis, rank, `iia` (held-out,
        an Estimate), `iia_train`, and the controls' held-out IIA at the same site and rank
        (`placebo`, `arbitrary`, `untrained`; None where not run)."""
        found = self.summary.get("variables", {})
        if variable not in found:
            raise RunError(f"no variable {variable!r}; variables: {', '.join(found)}")
        return found[variable]

    def sites(self) -> dict[str, list[Unit]]:
        """The best unit (a site, or a joint group) of every variable that has one: where to test
        the control model."""
        return {
            name: [_unit(entry["group"]) if entry.get("group") else Site(**entry["site"])]
            for name, entry in self.summary.get("variables", {}).items()
            if entry["site"]
        }

    def figures(self) -> dict[str, go.Figure]:
        variables = [v for v in self.table["variable"].unique() if not map_rows(self.table, v).empty]
        figs = {f"abstraction.{v}": iia_maps(self.table, v) for v in variables}
        best = {
            f"{name}: {label}": e
            for name, entry in self.summary.get("variables", {}).items()
            for label, e in [("iia", entry["iia"]), *((k, entry[k]) for k in CONTROLS)]
            if e is not None
        }
        if best:
            figs["abstraction.best"] = figures.estimates(
                best, "IIA on held-out pairs at each variable's best site, with its controls"
            )
        return figs


def map_rows(table: pd.DataFrame, variable: str) -> pd.DataFrame:
    """The rows of one variable's map: the map bases' held-out IIA at each (layer, block)'s chosen slot."""
    part = table[(table["variable"] == variable) & table["chosen"] & table["iia"].notna()]
    return part[part["basis"].isin([PROBE, RANDOM, PLACEBO, FULL])]


def iia_maps(table: pd.DataFrame, variable: str, title: str = "") -> go.Figure:
    """Heat maps of held-out IIA over layer x block for one variable, one per map basis (the
    primary basis and its placebo), at the slot chosen on training pairs."""
    part = map_rows(table, variable)
    bases = [b for b in (PROBE, RANDOM, PLACEBO, FULL) if b in set(part["basis"])]
    fig = make_subplots(rows=1, cols=max(len(bases), 1), subplot_titles=bases, shared_yaxes=True)
    for i, basis in enumerate(bases, 1):
        cells = part[part["basis"] == basis]
        grid = cells.pivot_table(index="layer", columns="block", values="iia", aggfunc="max")
        slots = cells.pivot_table(index="layer", columns="block", values="slot", aggfunc="first")
        fig.add_trace(
            go.Heatmap(
                z=grid.values,
                x=[str(k) for k in grid.columns],
                y=[str(l) for l in grid.index],
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                text=np.round(grid.values, 2),
                texttemplate="%{text}",
                customdata=slots.reindex_like(grid).values,
                hovertemplate="layer %{y}, block %{x}, slot %{customdata}: IIA %{z:.3f}<extra></extra>",
                showscale=i == len(bases),
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="block", type="category", row=1, col=i)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    fig.update_layout(title=title or f"{variable}: interchange-intervention accuracy (held-out pairs)")
    return fig
