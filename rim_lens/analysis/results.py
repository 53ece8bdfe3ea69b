"""Typed analysis results: a table, a summary, a record of what was done, figures, and `save`.

Every `Lab` method returns one. `result.table` is a pandas DataFrame (blocks labelled 1..K),
`result.figure()` its main plotly figure, `result.save(dir)` writes `<stem>.parquet` for each
table, `<summary stem>.json` (the summary plus `record`: model and options fingerprints, see
`fingerprint`) and `<stem>.<figure>.fig.json` for each figure. `result.record` says exactly
what was done: the analysis, the selection, the intervention (`Intervention.to_dict()`), the
examples, the backend.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.analysis.sites import BlockStates, block_labels
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write, atomic_write_json, atomic_write_text, read_json
from rim_lens.stats import Estimate, bootstrap, proportion


def plain(obj):
    """JSON-safe copy: NaN becomes null (strict JSON has no NaN), numpy scalars and Estimates
    become Python values and dicts."""
    if isinstance(obj, Estimate):
        return plain(obj.to_dict())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    return None if isinstance(obj, float) and math.isnan(obj) else obj


@dataclass(repr=False)
class Result:
    """What an analysis found. Subclasses set `name` and may add tables and figures."""

    table: pd.DataFrame
    summary: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    name: ClassVar[str] = ""
    summary_stem: ClassVar[str | None] = None  # default: `name`

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by file stem."""
        return {self.name: self.table}

    def figures(self) -> dict[str, go.Figure]:
        """Every figure by file stem (`<table stem>.<figure>`)."""
        return {}

    def figure(self, which: str | None = None) -> go.Figure:
        """The main figure, or the one whose name ends with `which`."""
        figs = self.figures()
        if not figs:
            raise RunError(f"{self.name}: this result has no figure")
        if which is None:
            return next(iter(figs.values()))
        found = [fig for key, fig in figs.items() if key.endswith(which)]
        if not found:
            raise RunError(f"{self.name}: no figure {which!r}; figures: {', '.join(figs)}")
        return found[0]

    def save(self, directory: str | Path) -> Path:
        """Write the tables, the summary with its record, and the figures into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for stem, table in self.tables().items():
            atomic_write(out / f"{stem}.parquet", partial(table.to_parquet, index=False))
        atomic_write_json(
            out / f"{self.summary_stem or self.name}.json", plain({**self.summary, "record": self.record})
        )
        for stem, fig in self.figures().items():
            atomic_write_text(out / f"{stem}.fig.json", fig.to_json())
        return out

    def __repr__(self) -> str:
        shown = {k: v for k, v in plain(self.summary).items() if not isinstance(v, dict | list)}
        return f"{type(self).__name__}({len(self.table)} rows, {shown})"


def _estimate(flags: np.ndarray) -> Estimate:
    return proportion(np.asarray(flags, dtype=bool))


def with_intervals(rows: list[dict], flags: np.ndarray, key: str = "accuracy") -> None:
    """Add key, key_lo, key_hi (Wilson) to each row from its flags [rows, examples]."""
    for row, f in zip(rows, flags):
        e = _estimate(f)
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = e.value, e.lo, e.hi


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
        return _estimate(self.correct[self._row(scope)])

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
        return _estimate(self.correct[int(np.flatnonzero(rows.to_numpy())[0])])

    def figures(self) -> dict[str, go.Figure]:
        return {"knockout.bars": figures.knockout_bars(self.table)}


@dataclass(repr=False)
class PatchResult(Result):
    """The patching grid: mean logit difference and recovery per (layer, block[, slot]); the
    per-pair logit differences clean [P], corrupt [P] and patched [cells, P] give intervals."""

    clean: np.ndarray | None = None
    corrupt: np.ndarray | None = None
    patched: np.ndarray | None = None
    sets: pd.DataFrame | None = None  # sets of sites patched together (`causal.patch_sets`)
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


@dataclass(repr=False)
class AttributionResult(PatchResult):
    """Attribution patching (`attribution`): exact patching's table and per-pair arrays, estimated
    from gradients; `edges` which block reads which per layer, `components` TransformerLens' node
    scores at block positions (either may be empty)."""

    edges: pd.DataFrame = field(default_factory=pd.DataFrame)
    components: pd.DataFrame = field(default_factory=pd.DataFrame)
    name: ClassVar[str] = "patch_attribution"

    def tables(self) -> dict[str, pd.DataFrame]:
        extra = {"patch_edges": self.edges, "patch_components": self.components}
        return {self.name: self.table, **{stem: t for stem, t in extra.items() if len(t)}}

    def figures(self) -> dict[str, go.Figure]:
        figs = {
            "patch_attribution.heatmap": figures.layer_block_heatmap(
                self.table, "recovery", "Attribution patching: estimated recovery of the clean answer", zmid=0
            )
        }
        if len(self.edges):
            figs["patch_edges.heatmap"] = figures.block_edges_heatmap(self.edges)
        return figs


@dataclass(repr=False)
class InterchangeResult(Result):
    """B given A's block states: how often B's output becomes A's answer, stays B's or neither.
    `to_a` holds the per-pair outcomes [rows of the table, pairs]; `pairs` the (A, B) indices."""

    to_a: np.ndarray | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    changed: np.ndarray | None = None  # [rows, pairs]: B's output is no longer what it was
    logprob_gain: np.ndarray | None = None  # [rows, pairs]: A's answer's log-prob, swapped - intact
    donor_tokens: np.ndarray | None = None  # [pairs]: every block swapped (`causal.donor_tokens`)
    values: pd.DataFrame | None = None  # the matched/unmatched-value interchange (`causal.value_interchange`)
    name: ClassVar[str] = "interchange"

    def tables(self) -> dict[str, pd.DataFrame]:
        values = self.values if self.values is not None and len(self.values) else None
        return {self.name: self.table, **({"interchange_values": values} if values is not None else {})}

    def _row(self, swap: str) -> int:
        return int(np.flatnonzero(self.table["swap"].to_numpy() == swap)[0])

    def transfer(self, swap: str = "all") -> Estimate:
        """The rate at which B's output becomes A's answer, with its Wilson interval over pairs."""
        return _estimate(self.to_a[self._row(swap)])

    def changed_rate(self, swap: str = "all") -> Estimate:
        """The rate at which B's output changes from what it was, with its Wilson interval."""
        return _estimate(self.changed[self._row(swap)])

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
        return _estimate(self.table["correct"].to_numpy())

    def figures(self) -> dict[str, go.Figure]:
        return {"decode.accuracy": figures.estimates({"accuracy": self.accuracy()}, "Greedy accuracy")}


@dataclass(repr=False)
class EffectResult(Result):
    """One example read out after every block k, intact and under an intervention: readouts,
    whether they are right, and the gold answer's log-prob."""

    name: ClassVar[str] = "effect"

    def figures(self) -> dict[str, go.Figure]:
        return {"effect.bars": figures.intervention_effect(self.table)}


# -- representations ---------------------------------------------------------------------------------
@dataclass(repr=False)
class CaptureResult(Result):
    """A capture of block states on disk (`store`: read by layer, block, slot) and its examples."""

    store: object = None
    name: ClassVar[str] = artefacts.CAPTURE

    def figures(self) -> dict[str, go.Figure]:
        if not self.store.meta.get("readouts", True):
            return {}
        per_block = {f"block {k}": _estimate(self.store.correct(block=k)) for k in block_labels(self.store.K)}
        return {"capture.readouts": figures.estimates(per_block, "Accuracy of the readout after each block")}

    def save(self, directory: str | Path) -> Path:
        """Copy the capture to `directory`/capture (nothing to do if it is there already)."""
        target = Path(directory) / artefacts.CAPTURE
        if target.resolve() != Path(self.store.path).resolve():
            shutil.copytree(self.store.path, target, dirs_exist_ok=True)
        return Path(directory)


@dataclass(repr=False)
class PCAResult(Result):
    """PCA of block states per layer: the mean trajectory through blocks 1..K (`table`), a few
    examples' trajectories, explained variance, input dependence, and the fitted PCAs
    (`fits`, by layer) to project other states with `project`."""

    examples: pd.DataFrame | None = None
    explained: pd.DataFrame | None = None
    dependence: pd.DataFrame | None = None
    fits: dict = field(default_factory=dict)
    name: ClassVar[str] = "pca"
    summary_stem: ClassVar[str] = "pca_input_dependence"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "pca": self.table,
            "pca_examples": self.examples,
            "pca_explained": self.explained,
            "pca_input_dependence": self.dependence,
        }

    def projection(self, states: BlockStates, example: int = 0) -> pd.DataFrame:
        """One example's states (e.g. `lab.states([ex])`) in each fitted layer's components:
        layer, block, slot, pc1, pc2, ..."""
        rows = []
        for layer in [l for l in states.layers if l in self.fits]:
            z = self.project(states.resid(layer=layer)[example], layer)  # [K, slots, components]
            rows += [
                {
                    "layer": layer,
                    "block": k,
                    "slot": j,
                    **{f"pc{i + 1}": float(v) for i, v in enumerate(z[b, j])},
                }
                for b, k in enumerate(block_labels(states.K))
                for j in range(z.shape[1])
            ]
        return pd.DataFrame(rows)

    def project(self, states: np.ndarray, layer: int) -> np.ndarray:
        """States [..., d_model] of `layer` in that layer's principal components [..., n_components]."""
        if layer not in self.fits:
            raise RunError(f"no PCA was fitted at layer {layer} (fitted: {sorted(self.fits)})")
        flat = np.asarray(states, dtype=np.float64).reshape(-1, states.shape[-1])
        return self.fits[layer].transform(flat).reshape(*states.shape[:-1], -1)

    def figures(self) -> dict[str, go.Figure]:
        return {
            "pca.trajectories": figures.pca_trajectories(self.table, self.examples),
            "pca_input_dependence.heatmap": figures.layer_block_heatmap(
                self.dependence, "ratio", "Input dependence: variance across inputs / across blocks"
            ),
        }


@dataclass(repr=False)
class ProbeResult(Result):
    """Value probes (`table`: per layer, block, step) and correctness probes (`correctness`),
    with probe-based answer selection in the summary. `best` picks the most selective value
    probe on some examples and scores it on others."""

    correctness: pd.DataFrame | None = None
    hits: dict = field(default_factory=dict)  # (layer, block, step) -> (rows, hits, control hits)
    groups: np.ndarray | None = None  # question group of every probed example
    name: ClassVar[str] = "probe_values"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"probe_correctness": self.correctness, "probe_values": self.table}

    def best(
        self,
        select_on: np.ndarray | None = None,
        score_on: np.ndarray | None = None,
        variable: str = "value",
    ) -> dict | None:
        """The (layer, block, step) probe of `variable` (default: the value each step writes) with
        the highest selectivity on the examples `select_on` (indices; default all), and its
        selectivity on `score_on` (default all) with a bootstrap interval over question groups.
        With the defaults the cell is chosen and scored on the same examples, which is optimistic
        (the maximum of a grid)."""

        def selectivity(cell, chosen):
            rows, hits, control = self.hits[cell]
            keep = np.ones(len(rows), bool) if chosen is None else np.isin(rows, chosen)
            return rows[keep], (hits - control)[keep], hits[keep], control[keep]

        scored = {}
        for cell in self.hits:
            if cell[2] != variable:
                continue
            _, diff, _, _ = selectivity(cell, select_on)
            if diff.size:
                scored[cell] = diff.mean()
        if not scored:
            return None
        cell = max(scored, key=scored.get)
        rows, diff, hits, control = selectivity(cell, score_on)
        if not diff.size:
            return None
        layer, block, variable, step = cell
        return {
            "layer": layer,
            "block": block,
            "variable": variable,
            "step": step,
            "score": float(hits.mean()),
            "control": float(control.mean()),
            "selectivity": bootstrap(diff, groups=self.groups[rows]),
        }

    def figures(self) -> dict[str, go.Figure]:
        figs = {}
        if self.correctness is not None and len(self.correctness):
            figs["probe_correctness.auroc"] = figures.layer_block_heatmap(
                self.correctness, "auroc", "Correctness probe AUROC", zmid=0.5
            )
        figs["probe_values.steps"] = figures.value_probe_heatmap(self.table)
        figs["probe_values.curves"] = figures.probe_curves(self.table)
        return figs


@dataclass(repr=False)
class LensResult(Result):
    """Logit (and tuned) lens: top tokens per (layer, block, slot), and each lens' agreement
    with the model's own final-layer prediction (`quality`)."""

    quality: pd.DataFrame | None = None
    name: ClassVar[str] = "lens"

    def tables(self) -> dict[str, pd.DataFrame]:
        tables = {"lens": self.table}
        if self.quality is not None:
            tables["lens_quality"] = self.quality
        return tables

    def figures(self) -> dict[str, go.Figure]:
        return {"lens.top1": figures.lens_top_tokens(self.table)}


# -- saved results --------------------------------------------------------------------------------
def _missing(run_dir: str | Path, stem: str) -> RunError:
    what = artefacts.analysis_of(stem)
    return RunError(f"{run_dir}: no {what} analysis; produce it with `rim-lens analyze {what} {run_dir}`")


def load_table(run_dir: str | Path, stem: str) -> pd.DataFrame:
    """A saved analysis table; RunError naming the command that produces it if missing."""
    path = Path(run_dir) / artefacts.ANALYSIS / f"{stem}.parquet"
    if not path.exists():
        raise _missing(run_dir, stem)
    return pd.read_parquet(path)


def load_summary(run_dir: str | Path, stem: str) -> dict:
    """A saved analysis summary (with its `record`); RunError naming the command if missing."""
    path = Path(run_dir) / artefacts.ANALYSIS / f"{stem}.json"
    if not path.exists():
        raise _missing(run_dir, stem)
    return read_json(
        path, RunError, f"produce it again with `rim-lens analyze {artefacts.analysis_of(stem)} {run_dir}`"
    )
