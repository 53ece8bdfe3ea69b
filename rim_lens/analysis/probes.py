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

import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from rim_lens.analysis import figures
from rim_lens.analysis.capture import CaptureStore
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, block_labels
from rim_lens.errors import RunError
from rim_lens.stats import bootstrap

ControlType = Callable[[dict], str]
VALUE = "value"  # the variable a step writes; others are derived (`Task.derived_values`)
# A control task must be learnable at the probe's capacity (Hewitt & Liang 2019): out of fold a
# probe can only learn a type's random label from other examples of the same type, so every
# type needs this many examples on average.
MIN_EXAMPLES_PER_TYPE = 10
# Value probes fit their (layer, block) cells on this many cores (joblib; -1: all): a report fits
# thousands of small probes, and they dominate its time.
PROBE_JOBS = -1


def leading_words(example: dict, k: int = 2) -> str:
    """A control type: the question's first k words (e.g. a start value and its first operator)."""
    return " ".join(example["question"].split()[:k])


def control_types(examples: list[dict], min_per_type: int = MIN_EXAMPLES_PER_TYPE) -> np.ndarray:
    """The default control types: the question's first k words, with the largest k that leaves
    at least `min_per_type` examples per type on average (at least one word). More words give a
    harder control, but one whose types are too rare to be learned out of fold: then the control
    scores near chance whatever the states hold and selectivity is just score minus chance."""
    longest = max(len(ex["question"].split()) for ex in examples)
    best = np.array([leading_words(ex, 1) for ex in examples])
    for k in range(2, longest + 1):
        types = np.array([leading_words(ex, k) for ex in examples])
        if len(types) / len(np.unique(types)) < min_per_type:
            break
        best = types
    return best


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardised L2 logistic regression (multinomial with more than two classes).

    C defaults to 0.1: block states often have more features than a fold has examples, and
    then a weakly regularised probe separates any labelling (and converges slowly); a
    less expressive probe is also the more selective one (Hewitt & Liang 2019).
    tol defaults to 1e-3, not sklearn's 1e-4: on demo block states it halves the time of a fit
    (a report fits thousands) and moved out-of-fold digit accuracies by at most 0.005.
    Fitted on a single class it predicts that class, so a cross-validation fold that happens
    to lack a rare class does not fail.
    """

    def __init__(self, C: float = 0.1, max_iter: int = 1000, tol: float = 1e-3) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        self.classes_ = np.unique(y)
        self.pipeline_ = None
        if len(self.classes_) > 1:
            model = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol)
            self.pipeline_ = make_pipeline(StandardScaler(), model).fit(X, y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.pipeline_ is None:
            return np.ones((len(X), 1))
        return self.pipeline_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


# -- shared machinery ----------------------------------------------------------------------------
def question_groups(store: CaptureStore) -> np.ndarray:
    """Group id (0..G-1) per example; examples with identical questions share one."""
    return np.unique([ex["question"] for ex in store.examples], return_inverse=True)[1]


def control_labels(y: np.ndarray, types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang control labels: each input type gets one label drawn from the empirical
    distribution of `y`, and every example takes its type's label."""
    kinds, inverse = np.unique(types, return_inverse=True)
    # A control task needs two classes to be a classification problem; redraw in the rare case
    # (few types) that every type drew the same label.
    for _ in range(100):
        drawn = y[rng.integers(len(y), size=len(kinds))]
        if len(kinds) < 2 or len(np.unique(y)) < 2 or len(np.unique(drawn)) > 1:
            break
    return drawn[inverse]


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (train, test) folds that keep every question group whole.

    They depend only on labels and groups, so callers compute them once per label vector and
    reuse them across (layer, block) cells: on 10,000 examples the split alone takes seconds.
    """
    n_splits = min(folds, len(np.unique(groups)))
    if np.unique(y, return_counts=True)[1].max() < n_splits:
        # StratifiedGroupKFold refuses more splits than its largest class has members (e.g. a
        # late step that few examples reach): such labels cannot be stratified anyway.
        return list(GroupKFold(n_splits=n_splits).split(np.zeros((len(y), 1)), y, groups))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Values rarer than the number of folds are expected; they only cost accuracy.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(cv.split(np.zeros((len(y), 1)), y, groups))


def oof_proba(
    X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], C: float = 0.1
) -> np.ndarray:
    """Out-of-fold class probabilities of a LinearProbe: [n, classes of y in sorted order]."""
    # One BLAS thread: probe problems are small, and on a busy 2-core machine threaded BLAS made
    # each fit about 20 times slower.
    with warnings.catch_warnings(), threadpool_limits(1):
        # A rare value missing from a training fold is expected; it only costs accuracy.
        warnings.filterwarnings(
            "ignore", message="Number of classes in training fold", category=RuntimeWarning
        )
        return cross_val_predict(LinearProbe(C), X, y, cv=folds, method="predict_proba")


def bootstrap_ci(
    stat: Callable[[np.ndarray], np.ndarray],
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval of a statistic when question groups are resampled with replacement.

    `stat` maps row weights [B, n] (how often each row was drawn in each of B replicates) to
    values [B, ...]; the interval (lo, hi) has the trailing shape.
    """
    groups = np.unique(groups, return_inverse=True)[1]
    G = groups.max() + 1
    counts = np.random.default_rng(seed).multinomial(G, np.full(G, 1 / G), size=n_boot)
    stats = np.concatenate(
        [stat(counts[i : i + chunk][:, groups].astype(float)) for i in range(0, n_boot, chunk)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: the interval is NaN
        lo, hi = np.nanpercentile(stats, [2.5, 97.5], axis=0)
    return lo, hi


def weighted_ranking(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC and AUPRC (average precision) of scores `p` for labels `y` under each row of
    weights `w` [B, n]: [B, 2], NaN where a class has no weight.

    Equal to sklearn's roc_auc_score / average_precision_score with sample_weight, but
    vectorised over replicates: sklearn's per-call overhead would dominate a 1000-fold bootstrap.
    """
    order = np.argsort(-p, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(p[order])) + 1]  # tied scores form one threshold
    w, y = w[:, order], y[order]
    tp = np.cumsum(np.add.reduceat(w * y, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w * ~y, starts, axis=1), axis=1)
    tp0, fp0 = np.pad(tp, ((0, 0), (1, 0)))[:, :-1], np.pad(fp, ((0, 0), (1, 0)))[:, :-1]
    P, N = tp[:, -1], fp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((fp - fp0) * (tp + tp0) / 2).sum(1) / (P * N)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
        auprc = ((tp - tp0) * precision).sum(1) / P
    auroc[(P == 0) | (N == 0)] = np.nan
    auprc[(P == 0) | (N == 0)] = np.nan
    return np.stack([auroc, auprc], 1)


Slots = int | Seq[int] | None  # one slot, several (their states concatenated), or all


def _slot_list(slots: Slots) -> list[int] | None:
    return [slots] if isinstance(slots, int | np.integer) else None if slots is None else list(slots)


def _features(store: CaptureStore, layer: int, block: int, slots: Slots) -> np.ndarray:
    """Block states of every example as [n, features]: the chosen slots (default all) concatenated."""
    states = store.resid(layer=layer, block=block)  # [n, slots, d]; checks layer and block
    chosen = _slot_list(slots)
    if chosen is not None:
        bad = [j for j in chosen if not 0 <= j < states.shape[1]]
        if bad or not chosen:
            raise RunError(f"slot {bad or chosen} out of range: slots are 0..{states.shape[1] - 1}")
        states = states[:, chosen]
    return states.reshape(len(states), -1)


CONSTANT = "block states are the same for every example here (e.g. a block token's embedding)"


def constant(X: np.ndarray) -> bool:
    """Whether every example has the same features: nothing to probe, and a probe fitted anyway
    scores the majority class, which must not compete for the best cell."""
    return not np.ptp(X, axis=0).any()


def _cell(layer: int, block: int, slots: Slots) -> dict:
    chosen = _slot_list(slots)
    where = (
        {}
        if chosen is None
        else {"slot": chosen[0]}
        if len(chosen) == 1
        else {"slots": ",".join(map(str, chosen))}
    )
    return {"layer": layer, "block": block, **where}


@dataclass
class _Problem:
    """What to probe for: the examples (rows) that have the target, label columns (one per
    subproblem, e.g. per digit), their control labels, and the folds of each, shared by every
    (layer, block)."""

    rows: np.ndarray
    labels: list[np.ndarray]
    control: list[np.ndarray]
    folds: list[list]
    control_folds: list[list]

    @property
    def control_ok(self) -> bool:
        return all(len(np.unique(c)) > 1 for c in self.control)


def _problem(
    rows: np.ndarray,
    labels: list[np.ndarray],
    types: np.ndarray,
    groups: np.ndarray,
    folds: int,
    seed: int,
    key: tuple[int, ...],
) -> _Problem:
    g = groups[rows]
    control = [
        control_labels(col, types[rows], np.random.default_rng([seed, *key, c]))
        for c, col in enumerate(labels)
    ]
    return _Problem(
        rows,
        labels,
        control,
        [grouped_folds(col, g, folds, seed) for col in labels],
        [grouped_folds(col, g, folds, seed) for col in control],
    )


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
            X = _features(store, layer, k, slots)
            columns.append(oof_proba(X, y, grouped_folds(y, groups, folds, seed), C)[:, 1])
    return np.stack(columns, 1)


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
    types = (
        control_types(store.examples)
        if control_type is None
        else np.array([control_type(ex) for ex in store.examples])
    )
    problems: dict[int, _Problem | None] = {}  # per block, made when first needed
    rows = []
    for layer in store.layers if layers is None else layers:
        for k in block_labels(store.K) if blocks is None else blocks:
            X = _features(store, layer, k, slots)  # first: it checks layer, block and slot
            y = store.correct(block=k)
            row = {
                **_cell(layer, k, slots),
                "auroc": np.nan,
                "auroc_lo": np.nan,
                "auroc_hi": np.nan,
                "auprc": np.nan,
                "auprc_lo": np.nan,
                "auprc_hi": np.nan,
                "control_auroc": np.nan,
                "selectivity": np.nan,
                "base_rate": float(y.mean()),
                "n": len(y),
                "note": "",
            }
            rare = int(min(y.sum(), len(y) - y.sum()))
            if k not in problems:
                problems[k] = (
                    _problem(np.arange(store.n), [y], types, groups, folds, seed, (k,))
                    if rare >= min_class
                    else None
                )
            pb = problems[k]
            if constant(X):
                rows.append({**row, "note": CONSTANT})
                continue
            if pb is None:
                what = (
                    f"all {'right' if y.mean() > 0.5 else 'wrong'}"
                    if rare == 0
                    else f"only {rare} {'wrong' if y.mean() > 0.5 else 'right'}"
                )
                rows.append(
                    {**row, "note": f"readouts after block {k} are {what} (need {min_class} of each class)"}
                )
                continue
            p = oof_proba(X, y, pb.folds[0], C)[:, 1]
            row["auroc"], row["auprc"] = roc_auc_score(y, p), average_precision_score(y, p)
            (row["auroc_lo"], row["auprc_lo"]), (row["auroc_hi"], row["auprc_hi"]) = bootstrap_ci(
                lambda w, y=y, p=p: weighted_ranking(y, p, w), groups, n_boot, seed
            )
            if pb.control_ok:
                p_control = oof_proba(X, pb.control[0], pb.control_folds[0], C)[:, 1]
                row["control_auroc"] = roc_auc_score(pb.control[0], p_control)
                row["selectivity"] = row["auroc"] - row["control_auroc"]
            else:
                row["note"] = "control labels have one class (one input type)"
            rows.append(row)
    return pd.DataFrame(rows)


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
    X: np.ndarray, problems: dict[tuple[str, int], _Problem], C: float
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
    types = (
        control_types(store.examples)
        if control_type is None
        else np.array([control_type(ex) for ex in store.examples])
    )
    variables = [VALUE] + sorted({name for ex in store.examples for name in (ex.get("derived") or {})})
    targets, problems, seen = {}, {}, {}
    for v_index, variable in enumerate(variables):
        n_steps = max(len(variable_values(ex, variable)) for ex in store.examples)
        for t in range(1, n_steps + 1) if steps is None else steps:
            targets[variable, t] = step_labels(store, t, n_digits, max_classes, variable)
            _, rows, labels, note = targets[variable, t]
            if not note:
                # A derived quantity can equal a step's own value (multiplication's first running
                # sum is its first partial product): one problem, with one control, fitted once.
                same = (rows.tobytes(), *(col.tobytes() for col in labels))
                if same not in seen:
                    seen[same] = _problem(rows, labels, types, groups, folds, seed, (v_index, t))
                problems[variable, t] = seen[same]
    cells = [
        (layer, k)
        for layer in (store.layers if layers is None else layers)
        for k in (block_labels(store.K) if blocks is None else blocks)
    ]
    # Cells are independent and each fits dozens of small probes: they run in worker processes
    # (the fits hold the GIL), in order, so the table does not depend on n_jobs.
    fitted = Parallel(n_jobs=n_jobs)(
        delayed(_cell_hits)(_features(store, layer, k, slots), problems, C) for layer, k in cells
    )
    out, per_example = [], {}
    for (layer, k), found in zip(cells, fitted):
        for (variable, t), (name, rows, labels, note) in targets.items():
            row = {
                **_cell(layer, k, slots),
                "variable": variable,
                "step": t,
                "target": name,
                "score": np.nan,
                "score_lo": np.nan,
                "score_hi": np.nan,
                "control": np.nan,
                "selectivity": np.nan,
                "chance": np.nan,
                "control_chance": np.nan,
                "n_types": len(np.unique(types[rows])),
                "n": len(rows),
                "note": note,
            }
            if (variable, t) in problems and found is None:
                row["note"] = CONSTANT
            elif (variable, t) in problems:
                pb = problems[variable, t]
                hits, control = found[variable, t]
                row["score"], row["chance"] = float(hits.mean()), _majority(labels)
                row["score_lo"], row["score_hi"] = bootstrap_ci(
                    lambda w, hits=hits: w @ hits / w.sum(1), groups[rows], n_boot, seed
                )
                if control is not None:
                    row["control"] = float(control.mean())
                    row["selectivity"] = row["score"] - row["control"]
                    row["control_chance"] = _majority(pb.control)
                    per_example[(layer, k, variable, t)] = (rows, hits, control)
                else:
                    row["note"] = "control labels have one class (one input type)"
            out.append(row)
    return pd.DataFrame(out), per_example


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
