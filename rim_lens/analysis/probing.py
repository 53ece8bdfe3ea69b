"""What the probes share: the linear probe, control tasks, question-grouped folds, out-of-fold
predictions, weighted ranking scores, and the features of a (layer, block[, slot]) cell.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from rim_lens.analysis.capture import CaptureStore
from rim_lens.errors import RunError

ControlType = Callable[[dict], str]


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


def slot_list(slots: Slots) -> list[int] | None:
    return [slots] if isinstance(slots, int | np.integer) else None if slots is None else list(slots)


def features(store: CaptureStore, layer: int, block: int, slots: Slots) -> np.ndarray:
    """Block states of every example as [n, features]: the chosen slots (default all) concatenated."""
    states = store.resid(layer=layer, block=block)  # [n, slots, d]; checks layer and block
    chosen = slot_list(slots)
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


def cell(layer: int, block: int, slots: Slots) -> dict:
    chosen = slot_list(slots)
    where = (
        {}
        if chosen is None
        else {"slot": chosen[0]}
        if len(chosen) == 1
        else {"slots": ",".join(map(str, chosen))}
    )
    return {"layer": layer, "block": block, **where}


@dataclass
class Problem:
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


def problem(
    rows: np.ndarray,
    labels: list[np.ndarray],
    types: np.ndarray,
    groups: np.ndarray,
    folds: int,
    seed: int,
    key: tuple[int, ...],
) -> Problem:
    g = groups[rows]
    control = [
        control_labels(col, types[rows], np.random.default_rng([seed, *key, c]))
        for c, col in enumerate(labels)
    ]
    return Problem(
        rows,
        labels,
        control,
        [grouped_folds(col, g, folds, seed) for col in labels],
        [grouped_folds(col, g, folds, seed) for col in control],
    )
