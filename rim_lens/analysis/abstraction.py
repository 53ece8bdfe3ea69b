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

    probe          the top-r directions of a value probe's weights (`probing.LinearProbe`)
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

Defaults (the module's constants and `subspaces`'; the report uses them): `PAIRS` pairs per part
and variable, at most `ceil(PAIRS / bases)` per base example. Every site is screened with the
full state on half the training pairs. The map fits the probe basis (rank 1) at each (layer,
block)'s slot most promising there and scores it and its placebo on held-out pairs. DAS (rank 1;
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from rim_lens.analysis import figures
from rim_lens.analysis.backends import make_backend
from rim_lens.analysis.engine import Variant, score
from rim_lens.analysis.results import Result, with_intervals
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import BlockStates, Selection, Site
from rim_lens.analysis.subspaces import (
    DAS_BATCH,
    DAS_EPOCHS,
    DAS_LR,
    PAIRS,
    Outcome,
    Pairs,
    Unit,
    arbitrary_answers,
    as_unit,
    das_directions,
    given_units,
    iia,
    joint_unit,
    make_pairs,
    plain_unit,
    probe_directions,
    random_directions,
    split_examples,
    unit_label,
    unit_sites,
    untrained_copy,
)
from rim_lens.artefacts import ABSTRACTION_BASES
from rim_lens.data.causal import CausalModel, Variable
from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.progress import progress
from rim_lens.stats import Estimate

# -- the analysis' choices, in one place ----------------------------------------------------------
DAS_SITES = 2  # sites per variable DAS is fitted at: the most promising on training pairs
# The report's capacity: ranks swept (the best chosen on training pairs; a unit stops its sweep once
# a rank reaches FULL_IIA there) over a joint unit (`joint_unit`) instead of single sites.
RANKS = (1, 2, 4, 8, 16)
FULL_IIA = 0.99
UNDERFIT = 0.1  # "DAS under-fit": its training IIA this far below the full state's at the same sites
# Basis names as the table writes them.
PROBE, DAS, RANDOM, FULL, PLACEBO = "probe", "das", "random", "full", "placebo"
DAS_PLACEBO, DAS_ARBITRARY, DAS_UNTRAINED = "das_placebo", "das_arbitrary", "das_untrained"
DAS_FULL = "das_full"  # the whole state at the best DAS unit
MAP_BASES = (PROBE, RANDOM, PLACEBO, FULL)  # the map's bases, in the order its figures show them
# The controls of the best DAS site, as the summary names them.
CONTROLS = {"placebo": DAS_PLACEBO, "arbitrary": DAS_ARBITRARY, "untrained": DAS_UNTRAINED}
# The DAS budget a result records (a change of any of it recomputes the result).
DAS_BUDGET = dict(sites=DAS_SITES, epochs=DAS_EPOCHS, batch_size=DAS_BATCH, lr=DAS_LR, full_iia=FULL_IIA)


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
    fixed = given_units(lab, sites, [v.name for v in variables])
    correct = score(lab.backend, lab.builder, lab.examples, [Variant()])[0][0].numpy()
    split = split_examples(lab, seed)
    states = lab.states(lab.examples, sel.layers)
    work, notes = _jobs(lab, model, variables, correct, split, seed)
    for job in progress(work, desc=f"abstraction ({method})", unit="variable"):
        if job.var.name in notes:
            continue
        chosen = _units(lab, sel, states, model, job, split[0], method, ranks, grid, fixed, joint, seed)
        if method == DAS and chosen:
            _das(lab, sel, model, job, chosen, ranks[job.var.name], controls, seed)
        elif method == DAS:
            notes[job.var.name] = "no site's state varies with the question: nothing to interchange"
    result = _result(lab, work, notes, correct, method, checked)
    result.record = lab.record(
        "abstraction",
        sel,
        None,
        variables=[v.name for v in variables],
        method=method,
        ranks=checked,
        sites={k: [plain_unit(u) for u in v] for k, v in fixed.items()},
        joint=joint,
        grid=grid,
        controls=controls,
        seed=seed,
        pairs=PAIRS,
        das=DAS_BUDGET,
    )
    return result


def _result(
    lab: Session, work: list[_Variable], notes: dict[str, str], correct: np.ndarray, method: str, ranks
) -> AbstractionResult:
    """The table of every variable's rows, the pairs, and the summary: each variable's best unit."""
    table = pd.DataFrame([row for job in work for row in job.rows], columns=_COLUMNS)
    table = table.astype({"rank": "int64", "layer": "int64", "block": "int64", "slot": "int64"})
    result = AbstractionResult(table, pairs=_pairs_table(lab, work))
    result.summary = {
        "method": method,
        "ranks": ranks,
        "correct": int(correct.sum()),
        "n": len(lab.examples),
        "variables": {job.var.name: _best(job, notes.get(job.var.name, "")) for job in work},
    }
    return result


def _jobs(
    lab: Session, model: CausalModel, variables: list[Variable], correct: np.ndarray, split: tuple, seed: int
) -> tuple[list[_Variable], dict[str, str]]:
    """Each variable's training and held-out pairs (among the examples the model answers
    correctly), and why a variable without informative pairs of both kinds is not tested."""
    work, notes = [], {}
    train_idx, test_idx = split
    for var in variables:
        train = make_pairs(lab, model, var.name, train_idx[correct[train_idx]], seed=seed)
        test = make_pairs(lab, model, var.name, test_idx[correct[test_idx]], seed=seed + 1)
        if not len(train) or not len(test):
            notes[var.name] = (
                f"no informative pairs among the {int(correct.sum())} examples the model answers "
                f"correctly ({len(train)} training, {len(test)} held-out)"
            )
        work.append(_Variable(var, train, test))
    return work, notes


def _pairs_table(lab: Session, work: list[_Variable]) -> pd.DataFrame:
    """Every pair each variable was scored on: its part (train, test), base and source ids, and
    the counterfactual answer."""
    rows = [
        {
            "variable": job.var.name,
            "part": part,
            "base": lab.examples[b].id,
            "source": lab.examples[s].id,
            "answer": a,
        }
        for job in work
        for part, ps in (("train", job.train), ("test", job.test))
        for b, s, a in zip(ps.base, ps.source, ps.answers)
    ]
    return pd.DataFrame(rows, columns=["variable", "part", "base", "source", "answer"])


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


def _units(
    lab: Session, sel: Selection, states: BlockStates, model: CausalModel, job: _Variable,
    train_idx: np.ndarray, method: str, ranks: dict[str, list[int]], grid: bool, fixed: dict[str, list[Unit]],
    joint: bool, seed: int,
) -> list[Unit]:  # fmt: skip
    """Where DAS goes for `job`'s variable: its units in `fixed`, else the most promising sites of
    its map (made, with its rows, at its lowest rank, with `grid` or without fixed units), or with
    `joint` the joint unit at the most promising site's layer."""
    promise, given = {}, fixed.get(job.var.name)
    if grid or given is None:
        promise = _map(lab, sel, states, model, job, train_idx, method, ranks[job.var.name][0], grid, seed)
    chosen = given or _promising(promise)
    if joint and chosen and given is None:
        # The joint unit at the most promising site's layer: it holds that site, and a subspace
        # of one site's state is a subspace of the joint state too.
        step = job.var.step if job.var.kind != "answer" else None
        chosen = [joint_unit(sel, chosen[0].layer, step)]
    return chosen


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
        group=None if isinstance(unit, Site) else plain_unit(unit),
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
            name: [as_unit(entry["group"]) if entry.get("group") else Site(**entry["site"])]
            for name, entry in self.summary.get("variables", {}).items()
            if entry["site"]
        }

    def figures(self) -> dict[str, go.Figure]:
        variables = [v for v in self.table["variable"].unique() if not map_rows(self.table, v).empty]
        figs = {f"abstraction.{v}": figures.iia_maps(map_rows(self.table, v), v) for v in variables}
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
    part = part[part["basis"].isin(MAP_BASES)]
    return part.sort_values("basis", key=lambda b: b.map(MAP_BASES.index), kind="stable")
