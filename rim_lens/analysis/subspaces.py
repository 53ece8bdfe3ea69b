"""Interchange along subspaces of block states: the interventions causal abstraction applies and
the bases it applies them along.

`Interchange` swaps a subspace of one site (`JointInterchange`: of a group of sites, a "unit")
between two examples; `iia` scores every unit on pairs in one sweep. The bases: a value probe's
directions, random ones, or learned by DAS (`das_directions`, through TransformerLens' `fit_das`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
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

from rim_lens.analysis import probes, verdict
from rim_lens.analysis.backends import Edit
from rim_lens.analysis.engine import Variant, score
from rim_lens.analysis.interventions import Patch
from rim_lens.analysis.probing import LinearProbe
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, Site, block_index
from rim_lens.data.causal import CausalModel
from rim_lens.errors import RunError
from rim_lens.model.layouts import Layout, block_positions

PAIRS = 128  # pairs per part (training, held-out) and variable
# 80 Adam steps of 16 pairs: on the hand-built model as close to the stored direction as fit_das'
# own 20 epochs at 32 pairs a step, at half the cost (a DAS step is a forward and backward pass).
DAS_EPOCHS = 10
DAS_BATCH = 16
DAS_LR = 1e-2  # Adam, as TransformerLens' fit_das


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
    with threadpool_limits(1):  # see probing.oof_proba
        for y in columns:
            probe = LinearProbe().fit(states, y)
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


def plain_unit(unit: Unit) -> list:
    """A unit as JSON: [layer, block, slot], or a list of those for a joint group."""
    return list(unit) if isinstance(unit, Site) else [list(s) for s in unit]


def as_unit(value: Site | Sequence) -> Unit:
    """A unit from `plain_unit`'s form (or a Site / tuple of Sites)."""
    if isinstance(value, Site):
        return value
    if len(value) and isinstance(value[0], int | np.integer):
        return Site(*value)
    return tuple(Site(*s) for s in value)


def given_units(
    lab: Session, sites: Sequence[Unit] | Mapping[str, Sequence[Unit]] | None, names: Sequence[str]
) -> dict[str, list[Unit]]:
    """Units given by variable name (a list: the same for each of `names`), each site checked."""
    if sites is None:
        return {}
    by_name = sites if isinstance(sites, Mapping) else {name: sites for name in names}
    out = {}
    for name, chosen in by_name.items():
        out[name] = [as_unit(u) for u in chosen]
        for unit in out[name]:
            for s in unit_sites(unit):
                lab.select([s.layer], [s.block], [s.slot])  # RunError naming the valid range
            if len({s.layer for s in unit_sites(unit)}) > 1:
                raise RunError("a joint unit's sites must share one layer")
    return out
