"""Linear probes on memory-block states, per (layer, block), with control tasks.

Two targets: (a) whether the readout after block k was correct, (b) the value of reasoning step
t: the `value` the step itself writes (a partial product, an equation's result), and each
quantity the task derives from the steps under its own name (e.g. multiplication's
`running_sum`; the last one is the answer). Every score is out-of-fold (StratifiedGroupKFold;
identical questions share one group, so a question never sits in train and test), with a
bootstrap 95% interval over question groups. Beside it stands the score of the same probe on a
Hewitt & Liang (2019) control task, and selectivity = score - control: a probe that scores high
only because it can read the question off the block states scores high on the control task too.
The control's types recur often enough (`MIN_EXAMPLES_PER_TYPE`) for it to be learnable out of
fold, and its accuracy is reported beside the probe's.

`transformer_lens.tools.analysis.sparse_probing` is not used: it fits k-sparse *binary* probes
on one train/test split, while step values are multi-class and every score here is
cross-validated.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from joblib import Parallel, delayed
from sklearn.metrics import average_precision_score, roc_auc_score

from rim_lens.analysis import figures
from rim_lens.analysis.capture import CaptureStore
from rim_lens.analysis.probing import (
    CONSTANT,
    PROBE_JOBS,
    ControlType,
    Problem,
    Slots,
    cell,
    constant,
    control_types,
    features,
    grouped_folds,
    oof_proba,
    problem,
    question_groups,
    weighted_ranking,
)
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, block_labels
from rim_lens.progress import progress
from rim_lens.stats import bootstrap, grouped_bootstrap

VALUE = "value"  # the variable a step writes; others are derived (`Task.derived_values`)


# -- (a) correctness -----------------------------------------------------------------------------
def correctness_probs(
    store: CaptureStore, layer: int, slots: Slots = None, folds: int = 5, seed: int = 0, C: float = 0.1
) -> np.ndarray:
    """Out-of-fold probability that the readout after each block is correct, at one layer: [n, K]."""
    groups = question_groups(store)
    columns = []
    for k in block_labels(store.K):
        y = store.correct(block=k)
        if y.all() or not y.any():
            columns.append(np.full(len(y), float(y[0])))
        else:
            X = features(store, layer, k, slots)
            columns.append(oof_proba(X, y, grouped_folds(y, groups, folds, seed), C)[:, 1])
    return np.stack(columns, 1)


# A correctness probe's columns that stay NaN where a cell cannot be fitted.
CORRECTNESS_SCORED = (
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "auprc",
    "auprc_lo",
    "auprc_hi",
    "control_auroc",
    "selectivity",
)


def probe_correctness(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    slots: Slots = None,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    C: float = 0.1,
    control_type: ControlType | None = None,
    min_class: int = 10,
) -> pd.DataFrame:
    """Probe each (layer, block)'s states for whether the readout after that block was correct.

    A block whose readouts are right (or wrong) fewer than `min_class` times gets NaN: an
    AUROC over a handful of positives is noise. Columns: layer, block, (slot if given), auroc,
    auroc_lo, auroc_hi, auprc, auprc_lo,
    auprc_hi, control_auroc, selectivity (auroc - control_auroc), base_rate (the fraction
    correct, AUPRC's chance level; AUROC's is 0.5), n, note (why a cell is NaN, else "").
    """
    groups = question_groups(store)
    types = _types(store, control_type)
    problems: dict[int, Problem | None] = {}  # per block, made when first needed
    rows = []
    for layer, k in progress(_cells(store, layers, blocks), desc="correctness probes", unit="cell"):
        X = features(store, layer, k, slots)  # first: it checks layer, block and slot
        y = store.correct(block=k)
        row = {
            **cell(layer, k, slots),
            **dict.fromkeys(CORRECTNESS_SCORED, np.nan),
            "base_rate": float(y.mean()),
            "n": len(y),
            "note": "",
        }
        rare = int(min(y.sum(), len(y) - y.sum()))
        if k not in problems:
            problems[k] = (
                problem(np.arange(store.n), [y], types, groups, folds, seed, (k,))
                if rare >= min_class
                else None
            )
        if constant(X):
            row["note"] = CONSTANT
        elif problems[k] is None:
            row["note"] = _one_sided(y, k, rare, min_class)
        else:
            row |= _correctness_scores(X, y, problems[k], groups, n_boot, seed, C)
        rows.append(row)
    return pd.DataFrame(rows)


def _types(store: CaptureStore, control_type: ControlType | None) -> np.ndarray:
    """Every example's control-task type: `control_type(example)`, by default `control_types`."""
    if control_type is None:
        return control_types(store.examples)
    return np.array([control_type(ex) for ex in store.examples])


def _cells(store: CaptureStore, layers: Seq[int] | None, blocks: Seq[int] | None) -> list[tuple[int, int]]:
    """The (layer, block) cells to probe: `layers` x `blocks`, by default every captured one."""
    return [
        (layer, k)
        for layer in (store.layers if layers is None else layers)
        for k in (block_labels(store.K) if blocks is None else blocks)
    ]


def _one_sided(y: np.ndarray, k: int, rare: int, min_class: int) -> str:
    """The note of a block whose readouts are right (or wrong) fewer than `min_class` times."""
    what = (
        f"all {'right' if y.mean() > 0.5 else 'wrong'}"
        if rare == 0
        else f"only {rare} {'wrong' if y.mean() > 0.5 else 'right'}"
    )
    return f"readouts after block {k} are {what} (need {min_class} of each class)"


def _correctness_scores(
    X: np.ndarray, y: np.ndarray, pb: Problem, groups: np.ndarray, n_boot: int, seed: int, C: float
) -> dict:
    """One cell's correctness probe: out-of-fold AUROC and AUPRC with bootstrap intervals over
    question groups, and the control task's AUROC with the selectivity (else a note why not)."""
    p = oof_proba(X, y, pb.folds[0], C)[:, 1]
    scores = {"auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p)}
    (scores["auroc_lo"], scores["auprc_lo"]), (scores["auroc_hi"], scores["auprc_hi"]) = grouped_bootstrap(
        lambda w: weighted_ranking(y, p, w), groups, n_boot, seed
    )
    if not pb.control_ok:
        return scores | {"note": "control labels have one class (one input type)"}
    p_control = oof_proba(X, pb.control[0], pb.control_folds[0], C)[:, 1]
    scores["control_auroc"] = roc_auc_score(pb.control[0], p_control)
    scores["selectivity"] = scores["auroc"] - scores["control_auroc"]
    return scores


def select_answers(
    store: CaptureStore,
    source: pd.DataFrame | np.ndarray,
    layer: int | None = None,
    slots: Slots = None,
    folds: int = 5,
    seed: int = 0,
    C: float = 0.1,
) -> dict:
    """Accuracy of answering with the block whose readout the probe finds most likely correct.

    `source` is either out-of-fold probabilities [n, K] (see `correctness_probs`) or a
    `probe_correctness` table, from which the probe is refit at `layer` (default: the layer
    with the highest mean AUROC; its slot column, if any, is reused). Returns `selected`
    next to the baselines `final_block` (the readout after block K), `random_block` (the
    expected accuracy of a uniformly random block) and `any_block` (the oracle), overall and
    as `*_when_any` on the `n_any` examples where some block is right.
    """
    if isinstance(source, pd.DataFrame):
        if layer is None:
            layer = int(source.groupby("layer")["auroc"].mean().idxmax())
        if slots is None and "slot" in source:
            slots = int(source["slot"].iloc[0])
        elif slots is None and "slots" in source:
            slots = [int(j) for j in str(source["slots"].iloc[0]).split(",")]
        probs = correctness_probs(store, layer, slots, folds, seed, C)
    else:
        probs = np.asarray(source, dtype=float)
    correct = store.correct()
    # Ties (e.g. blocks no probe can tell apart) go to the latest block, the default readout.
    pick = probs.shape[1] - 1 - np.argmax(probs[:, ::-1], axis=1)
    chosen = correct[np.arange(len(correct)), pick]
    some = correct.any(1)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else np.nan

    return {
        "layer": layer,
        "n": len(correct),
        "n_any": int(some.sum()),
        "selected": mean(chosen),
        "final_block": mean(correct[:, -1]),
        "random_block": mean(correct),
        "any_block": mean(some),
        "selected_when_any": mean(chosen[some]),
        "final_block_when_any": mean(correct[some, -1]),
        "random_block_when_any": mean(correct[some]),
    }


# -- (b) step values -----------------------------------------------------------------------------
def variable_values(example: dict, variable: str) -> list:
    """An example's per-step values of `variable` (`value` or a derived name)."""
    return example["values"] if variable == VALUE else (example.get("derived") or {}).get(variable, [])


def step_labels(
    store: CaptureStore, t: int, n_digits: int = 3, max_classes: int = 50, variable: str = VALUE
) -> tuple[str, np.ndarray, list[np.ndarray], str]:
    """What a probe for `variable` at step t predicts: (target name, rows = examples that have a
    value there, label columns, note saying why there is nothing to probe, else "") (see
    `value_columns`). A step whose value is missing (None, e.g. a GSM8K step that is not a
    number) is skipped."""
    per_example = [variable_values(ex, variable) for ex in store.examples]
    rows = np.array([i for i, v in enumerate(per_example) if len(v) >= t and v[t - 1] is not None], dtype=int)
    values = [per_example[i][t - 1] for i in rows]
    if not values:
        return "value", rows, [], f"no example has a {variable} at step {t}"
    if len(set(values)) == 1:
        return "value", rows, [], f"every example has the same {variable} at step {t}"
    name, columns, note = value_columns(values, n_digits, max_classes)
    return name, rows, columns, note


def value_columns(values: Seq, n_digits: int = 3, max_classes: int = 50) -> tuple[str, list[np.ndarray], str]:
    """How a probe predicts `values`: (target name, label columns, note saying why there is
    nothing to probe, else "").

    At most `max_classes` distinct values (or strings) are one column of classes; larger
    integers give one column per varying decimal digit among the lowest `n_digits`.
    """
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(set(values)) == 1:
        return "value", [], "every example has the same value"
    if len(set(values)) <= max_classes or not numeric:
        return "value", [np.array([str(v) for v in values])], ""
    if not all(float(v).is_integer() for v in values):
        return "value", [], f"non-integer values with > {max_classes} distinct"
    ints = np.array([abs(int(v)) for v in values])
    digits = [ints // 10**i % 10 for i in range(n_digits)]
    # A digit that never varies would be predicted perfectly and inflate the mean.
    kept = [i for i in range(n_digits) if len(np.unique(digits[i])) > 1]
    name = f"digits {','.join(map(str, kept))} (mean acc)"
    return name, [digits[i] for i in kept], "" if kept else f"lowest {n_digits} digits constant"


def _oof_hits(X: np.ndarray, labels: list[np.ndarray], folds: list[list], C: float) -> np.ndarray:
    """Per example, the fraction of label columns that the out-of-fold probe gets right."""
    right = [np.unique(y)[oof_proba(X, y, f, C).argmax(1)] == y for y, f in zip(labels, folds)]
    return np.mean(right, axis=0)


def _cell_hits(
    X: np.ndarray, problems: dict[tuple[str, int], Problem], C: float
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] | None:
    """One (layer, block)'s out-of-fold hits per problem: (probe hits, control hits or None when
    the control task has one class); None if the states are `constant`. A problem shared by
    several keys is fitted once."""
    if constant(X):
        return None
    hits = {
        id(pb): (
            _oof_hits(X[pb.rows], pb.labels, pb.folds, C),
            _oof_hits(X[pb.rows], pb.control, pb.control_folds, C) if pb.control_ok else None,
        )
        for pb in {id(pb): pb for pb in problems.values()}.values()
    }
    return {key: hits[id(pb)] for key, pb in problems.items()}


def _majority(labels: list[np.ndarray]) -> float:
    """Accuracy of always answering the most frequent class, averaged over label columns."""
    return float(np.mean([np.unique(y, return_counts=True)[1].max() / len(y) for y in labels]))


Hits = dict[tuple[int, int, str, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def probe_values(store: CaptureStore, **options) -> pd.DataFrame:
    """The table of `value_probes` (see there)."""
    return value_probes(store, **options)[0]


# A value probe's columns that stay NaN where a cell cannot be fitted.
SCORED = ("score", "score_lo", "score_hi", "control", "selectivity", "chance", "control_chance")


def _value_targets(store: CaptureStore, steps: Seq[int] | None, n_digits: int, max_classes: int) -> dict:
    """(variable, step t) -> `step_labels` of every variable (the step's `value`, then the derived
    ones by name) at every step t (or `steps`)."""
    variables = [VALUE] + sorted({name for ex in store.examples for name in (ex.get("derived") or {})})
    targets = {}
    for variable in variables:
        n_steps = max(len(variable_values(ex, variable)) for ex in store.examples)
        for t in range(1, n_steps + 1) if steps is None else steps:
            targets[variable, t] = step_labels(store, t, n_digits, max_classes, variable)
    return targets


def _fit_cells(
    store: CaptureStore,
    cells: list[tuple[int, int]],
    problems: dict,
    slots: Slots,
    C: float,
    n_jobs: int | None,
) -> list:
    """`_cell_hits` of every (layer, block) cell, in order, with a progress bar."""
    # Cells are independent and each fits dozens of small probes: they run in worker processes
    # (the fits hold the GIL), in order, so the table does not depend on n_jobs.
    jobs = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_cell_hits)(features(store, layer, k, slots), problems, C) for layer, k in cells
    )
    return list(progress(jobs, desc="value probes", total=len(cells), unit="cell"))


def value_probes(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    steps: Seq[int] | None = None,
    slots: Slots = None,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    C: float = 0.1,
    n_digits: int = 3,
    max_classes: int = 50,
    control_type: ControlType | None = None,
    n_jobs: int | None = PROBE_JOBS,
) -> tuple[pd.DataFrame, Hits]:
    """Probe each (layer, block)'s states for each step t's variables: the `value` the step
    writes, and every quantity the task derives from the steps (e.g. `running_sum`).

    Values with at most `max_classes` distinct values (or strings) are classes; larger integers
    are probed one lowest decimal digit at a time (10 classes each, up to `n_digits`) and
    scored by mean digit accuracy (see `step_labels`). Only examples with a step t count for
    step t. Block k holding step k's value shows as a diagonal in the block x step view.
    The control task's types are `control_type(example)` (default: `control_types`, learnable
    out of fold).

    Columns: layer, block, (slot if given), variable, step, target ("value" or the digits used),
    score (accuracy), score_lo, score_hi, control (the control task's accuracy), selectivity
    (score - control), chance and control_chance (majority-class accuracy of the real and the
    control labels: with few input types the control's class balance can differ), n_types (of
    the control task), n, note (why a cell is NaN, else "").

    Also returns the per-example outcomes of every fitted cell, (layer, block, variable, step)
    -> (rows probed, out-of-fold hits, control hits), from which a best cell can be chosen on
    some examples and scored on others (`results.ProbeResult.best`). The (layer, block) cells are
    fitted `n_jobs` at a time (joblib: None or 1 runs them here, -1 on every core).
    """
    groups = question_groups(store)
    types = _types(store, control_type)
    targets = _value_targets(store, steps, n_digits, max_classes)
    problems = _value_problems(targets, types, groups, folds, seed)
    cells = _cells(store, layers, blocks)
    fitted = _fit_cells(store, cells, problems, slots, C, n_jobs)
    out, per_example = [], {}
    for (layer, k), found in zip(cells, fitted):
        for (variable, t), (name, rows, labels, note) in targets.items():
            row = {**cell(layer, k, slots), "variable": variable, "step": t, "target": name}
            row |= dict.fromkeys(SCORED, np.nan) | {
                "n_types": len(np.unique(types[rows])),
                "n": len(rows),
                "note": note,
            }
            if (variable, t) in problems and found is None:
                row["note"] = CONSTANT
            elif (variable, t) in problems:
                hits, control = found[variable, t]
                row |= _value_scores(hits, control, labels, problems[variable, t], groups[rows], n_boot, seed)
                if control is not None:
                    per_example[(layer, k, variable, t)] = (rows, hits, control)
            out.append(row)
    return pd.DataFrame(out), per_example


def _value_problems(targets: dict, types: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> dict:
    """(variable, step t) -> the `problem` of every target with something to probe (see
    `_value_targets`)."""
    variables = list(dict.fromkeys(variable for variable, _ in targets))  # the problems' seeds
    problems, seen = {}, {}
    for (variable, t), (_, rows, labels, note) in targets.items():
        if not note:
            # A derived quantity can equal a step's own value (multiplication's first running
            # sum is its first partial product): one problem, with one control, fitted once.
            same = (rows.tobytes(), *(col.tobytes() for col in labels))
            if same not in seen:
                seen[same] = problem(rows, labels, types, groups, folds, seed, (variables.index(variable), t))
            problems[variable, t] = seen[same]
    return problems


def _value_scores(
    hits: np.ndarray,
    control: np.ndarray | None,
    labels: list[np.ndarray],
    pb: Problem,
    groups: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict:
    """One fitted value probe's scores: accuracy with a bootstrap interval over question `groups`
    and its chance, and the control task's accuracy, selectivity and chance (else a note why not)."""
    scores = {"score": float(hits.mean()), "chance": _majority(labels)}
    scores["score_lo"], scores["score_hi"] = grouped_bootstrap(
        lambda w: w @ hits / w.sum(1), groups, n_boot, seed
    )
    if control is None:
        return scores | {"note": "control labels have one class (one input type)"}
    scores["control"] = float(control.mean())
    scores["selectivity"] = scores["score"] - scores["control"]
    return scores | {"control_chance": _majority(pb.control)}


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
        for key in self.hits:
            if key[2] != variable:
                continue
            _, diff, _, _ = selectivity(key, select_on)
            if diff.size:
                scored[key] = diff.mean()
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


def analyse(lab: Session, sel: Selection, seed: int = 0, n_boot: int = 1000) -> ProbeResult:
    """Linear probes per (layer, block) of `sel` for whether the readout after the block is right
    and for every step's value, each beside a control task (selectivity = score - control)."""
    store = lab.capture().store
    chosen = None if len(sel.slots) == lab.spec.block_slots else list(sel.slots)
    options = dict(layers=sel.layers, blocks=sel.blocks, slots=chosen, seed=seed, n_boot=n_boot)
    correctness = probe_correctness(store, **options)
    values, hits = value_probes(store, **options)
    result = ProbeResult(values, correctness=correctness, hits=hits, groups=question_groups(store))
    fitted = correctness["auroc"].notna().any()
    auroc = correctness.groupby("layer")["auroc"].mean()
    best = result.best()
    result.summary = {
        "selection": select_answers(store, correctness, slots=chosen, seed=seed) if fitted else None,
        "correctness_auroc": float(auroc.max()) if fitted else None,
        "correctness_auroc_layer": int(auroc.idxmax()) if fitted else None,
        "best_value_probe": best,
    }
    result.record = lab.record("probe", sel, seed=seed, n_boot=n_boot)
    return result
