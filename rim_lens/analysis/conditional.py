"""Decodability against the question's own information: conditional probing (Hewitt, Ethayarajh,
Liang & Manning 2021).

A block that can see the question may hold the question, and a probe of block states can then
read a step's value as a function of the question without the block having computed anything.
So the fair bar is what the block ADDS: per (layer, block, step), the score of a probe on
[question states; block states] minus the score of the same probe on the question states alone
(both at that layer; the question's positions are `Role.QUESTION`). A probe is a multi-output
ridge regression (standardised features) onto three encodings of the step's value:

    digits     one-hot classes of each varying lowest decimal digit (or of the value itself when
               it takes few values, `probes.value_columns`), read by argmax: the score is the mean
               digit accuracy, the figure the verdict decides on
    angles     (cos, sin)(2 pi d / 10) of each digit d: R^2 (the Fourier code trained models use)
    value      the value itself, standardised: R^2

Probes are fitted on `TRAIN` examples of the run's training split, the ridge penalty and the best
(layer, block, step) are chosen on `VALIDATION` examples of its validation split, and the chosen
cell is scored once on the report's examples: the gain per example with a bootstrap interval
over question groups (`stats.bootstrap`), and a learning curve (the chosen cell refitted on the
first `CURVE` training examples). One eigendecomposition of the features' Gram matrix serves every
penalty and every target of a (layer, block), which makes the grid cheap; scikit-learn's `Ridge`
would refactor for each penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy.linalg import cho_factor, cho_solve
from threadpoolctl import threadpool_limits

from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.analysis.capture import question_and_block_states
from rim_lens.analysis.probes import value_columns
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection
from rim_lens.data import read_examples
from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.stats import Estimate, bootstrap

TRAIN = 2000  # training-split examples the probes are fitted on
VALIDATION = 500  # validation-split examples the penalty and the cell are chosen on
CURVE = (200, 1000, 2000)  # training sizes of the chosen cell's learning curve
ALPHAS = (1e-2, 1e-1, 1.0, 10.0)  # ridge penalties, times the number of training rows (chosen on validation)
FEATURES = ("question", "question_and_block")


@dataclass
class _Schema:
    """How one step's value is encoded, fixed on the training examples: the decimal places probed
    as one class column each (None: the value itself is one class column), the classes of each
    column, and how many digits its angle code has (0: not an integer)."""

    places: list[int] | None
    kinds: list[np.ndarray]
    angle_digits: int


@dataclass
class _Targets:
    """One split's encodings of a step's value: the rows that have it, the label columns, the
    one-hot of the schema's classes, the angle code and the value (None if not an integer)."""

    rows: np.ndarray
    columns: list[np.ndarray]
    onehot: np.ndarray
    angles: np.ndarray | None
    value: np.ndarray | None


def _values(examples: Sequence[Example], t: int) -> tuple[np.ndarray, list]:
    rows = [i for i, ex in enumerate(examples) if len(ex.values) >= t and ex.values[t - 1] is not None]
    return np.array(rows, dtype=int), [examples[i].values[t - 1] for i in rows]


def _integers(values: list) -> bool:
    return bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer() for v in values
    )


def _schema(examples: Sequence[Example], t: int) -> _Schema | None:
    """Step t's encoding from the training examples (`probes.value_columns`); None if its value
    does not vary there."""
    _, values = _values(examples, t)
    name, columns, note = value_columns(values)
    if note or not columns:
        return None
    places = [int(i) for i in name.split(" ")[1].split(",")] if name.startswith("digits") else None
    digits = len(str(max(abs(int(v)) for v in values))) if _integers(values) else 0
    return _Schema(places, [np.unique(col) for col in columns], digits)


def _targets(schema: _Schema, examples: Sequence[Example], t: int) -> _Targets:
    """Step t's value on `examples` in the schema's encodings."""
    rows, values = _values(examples, t)
    if schema.places is not None:
        columns = [np.array([abs(int(v)) // 10**i % 10 for v in values]) for i in schema.places]
    else:
        columns = [np.array([str(v) for v in values])]
    onehot = np.concatenate([(c[:, None] == k[None]).astype(float) for c, k in zip(columns, schema.kinds)], 1)
    angles = value = None
    if schema.angle_digits and _integers(values):
        ints = np.array([abs(int(v)) for v in values])
        d = np.stack([ints // 10**i % 10 for i in range(schema.angle_digits)], 1)
        angles = np.concatenate([np.cos(2 * np.pi * d / 10), np.sin(2 * np.pi * d / 10)], 1)
        value = ints.astype(float)
    return _Targets(rows, columns, onehot, angles, value)


def _layout(schema: _Schema) -> dict[str, slice]:
    """Where each encoding of a step sits among its regression targets."""
    width = sum(len(k) for k in schema.kinds)
    out = {"classes": slice(0, width)}
    if schema.angle_digits:
        out["angles"] = slice(width, width + 2 * schema.angle_digits)
        out["value"] = slice(width + 2 * schema.angle_digits, width + 2 * schema.angle_digits + 1)
    return out


def _columns(target: _Targets, schema: _Schema) -> np.ndarray:
    """The regression targets of one split: [rows, width of `_layout`]."""
    parts = [target.onehot]
    if schema.angle_digits:
        if target.angles is None:  # a split whose values are not integers: no angle target
            return np.pad(target.onehot, ((0, 0), (0, 2 * schema.angle_digits + 1)))
        parts += [target.angles, target.value[:, None]]
    return np.concatenate(parts, 1)


def _hits(pred: np.ndarray, target: _Targets, schema: _Schema, decoder: str) -> np.ndarray:
    """Per row, the share of the step's label columns read right: by the argmax over each column's
    predicted one-hot (`classes`) or by the digit nearest each predicted (cos, sin) (`angles`)."""
    where = _layout(schema)
    if decoder == "classes":
        block, hits, start = pred[:, where["classes"]], [], 0
        for col, kind in zip(target.columns, schema.kinds):
            hits.append(kind[block[:, start : start + len(kind)].argmax(1)] == col)
            start += len(kind)
        return np.mean(hits, 0)
    code = pred[:, where["angles"]]
    n = schema.angle_digits
    digits = np.rint(np.arctan2(code[:, n:], code[:, :n]) * 10 / (2 * np.pi)).astype(int) % 10
    if schema.places is not None:
        return np.mean([digits[:, i] == col for i, col in zip(schema.places, target.columns)], 0)
    values = (digits * 10 ** np.arange(n)).sum(1)
    return (values.astype(str) == target.columns[0]).astype(float)


def _r2(pred: np.ndarray, y: np.ndarray, mean: np.ndarray) -> float:
    """R^2 of predictions against targets, the baseline being the training mean."""
    total = ((y - mean) ** 2).sum()
    return float(1 - ((pred - y) ** 2).sum() / total) if total > 0 else math.nan


class _Standard:
    """Column standardisation fitted on training rows (columns constant there are dropped)."""

    def __init__(self, X: np.ndarray) -> None:
        self.mean_, std = X.mean(0), X.std(0)
        self.keep_ = std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12)
        self.scale_ = std[self.keep_]

    def __call__(self, X: np.ndarray) -> np.ndarray:
        # float32: the Gram products are most of a probe's time (the solve is in float64)
        return ((X[:, self.keep_] - self.mean_[self.keep_]) / self.scale_).astype(np.float32)


def _solve(G: np.ndarray, ZtY: np.ndarray, n: int) -> dict[float, np.ndarray]:
    """Ridge coefficients for every penalty in `ALPHAS` (times the n training rows) from the
    standardised features' Gram matrix G and Z^T Y: one Cholesky factorisation each."""
    G, ZtY, eye = G.astype(np.float64), ZtY.astype(np.float64), np.eye(len(G))
    return {a: cho_solve(cho_factor(G + a * n * eye), ZtY) for a in ALPHAS}


@dataclass
class _Fit:
    """The probe of one step from one feature set: its penalty and decoder chosen on validation,
    the validation score there, the R^2 of the angle and value encodings, the per-row test hits."""

    alpha: float
    decoder: str
    val: float
    angles_r2: float
    value_r2: float
    test_hits: np.ndarray


def _fits(
    Z: dict[str, np.ndarray], G: np.ndarray, ZtY: np.ndarray, group: dict, offsets: dict[int, int]
) -> dict[int, _Fit]:
    """Per step, the probe chosen on validation among every (penalty, decoder), given the
    standardised features of each split (`Z`, rows of the step group) and the training Gram."""
    coefs = _solve(G, ZtY, len(Z["train"]))
    y_mean = group["y_mean"]
    out = {}
    preds = {a: {s: Z[s] @ W + y_mean for s in ("val", "test")} for a, W in coefs.items()}
    for t, (schema, tr, va, te) in group["targets"].items():
        off, width = (
            offsets[t],
            sum(len(k) for k in schema.kinds) + (2 * schema.angle_digits + 1 if schema.angle_digits else 0),
        )
        decoders = ["classes"] + (["angles"] if schema.angle_digits and va.angles is not None else [])
        scored = {
            (a, d): float(np.mean(_hits(preds[a]["val"][:, off : off + width], va, schema, d)))
            for a in ALPHAS
            for d in decoders
        }
        alpha, decoder = max(scored, key=lambda k: (scored[k], k[0]))  # ties: the stronger penalty
        val_pred = preds[alpha]["val"][:, off : off + width]
        where = _layout(schema)
        angles_r2 = value_r2 = math.nan
        if "angles" in where and va.angles is not None:
            angles_r2 = _r2(val_pred[:, where["angles"]], va.angles, tr.angles.mean(0))
            value_r2 = _r2(val_pred[:, where["value"]][:, 0], va.value, tr.value.mean())
        hits = _hits(preds[alpha]["test"][:, off : off + width], te, schema, decoder)
        out[t] = _Fit(alpha, decoder, scored[(alpha, decoder)], angles_r2, value_r2, hits)
    return out


def _groups(splits: dict[str, _Split], steps: Sequence[int]) -> list[dict]:
    """The steps to probe, grouped by the training rows that have them (each group shares its
    features and Gram matrices): rows per split, targets per step, the stacked training targets."""
    encoded = {}
    for t in steps:
        schema = _schema(splits["train"].examples, t)
        if schema is not None:
            encoded[t] = (
                schema,
                *(_targets(schema, splits[s].examples, t) for s in ("train", "val", "test")),
            )
    groups: dict[tuple, dict] = {}
    for t, (schema, tr, va, te) in encoded.items():
        key = (tr.rows.tobytes(), va.rows.tobytes(), te.rows.tobytes())
        group = groups.setdefault(
            key, {"rows": {"train": tr.rows, "val": va.rows, "test": te.rows}, "targets": {}}
        )
        group["targets"][t] = (schema, tr, va, te)
    for group in groups.values():
        Y = np.concatenate([_columns(tr, schema) for schema, tr, _, _ in group["targets"].values()], 1)
        group["y_mean"] = Y.mean(0)
        group["Y"] = (Y - group["y_mean"]).astype(np.float32)
        widths = [_columns(tr, schema).shape[1] for schema, tr, _, _ in group["targets"].values()]
        group["offsets"] = dict(zip(group["targets"], np.cumsum([0, *widths[:-1]]).tolist()))
    return list(groups.values())


def _probe_layer(
    splits: dict[str, _Split],
    group: dict,
    li: int,
    blocks: Sequence[int],
    q_width: int,
    size: int | None = None,
) -> tuple[dict[int, _Fit], dict[int, dict[int, _Fit]]]:
    """At layer index `li`, the question-only probe of every step in `group` and, per block of
    `blocks` whose states vary, the [question; block] probe (first `size` training rows)."""
    rows = {s: r if s != "train" or size is None else r[r < size] for s, r in group["rows"].items()}
    if size is not None and len(rows["train"]) < len(group["rows"]["train"]):
        group = {**group, **_refit_targets(group, size)}
    Xq = {s: splits[s].question_features(li, q_width)[rows[s]] for s in rows}
    q_std = _Standard(Xq["train"])
    Zq = {s: q_std(x) for s, x in Xq.items()}
    Y = group["Y"]
    with threadpool_limits(1):  # small problems, many of them: see probing.oof_proba
        Gqq, ZqY = Zq["train"].T @ Zq["train"], Zq["train"].T @ Y
        question = _fits(Zq, Gqq, ZqY, group, group["offsets"])
        with_block = {}
        for k in blocks:
            Xb = {s: splits[s].block_features(li, k)[rows[s]] for s in rows}
            if not np.ptp(Xb["train"], axis=0).any():
                continue  # the same for every example (a block token's embedding): nothing to add
            b_std = _Standard(Xb["train"])
            Zb = {s: b_std(x) for s, x in Xb.items()}
            Gqb = Zq["train"].T @ Zb["train"]
            G = np.block([[Gqq, Gqb], [Gqb.T, Zb["train"].T @ Zb["train"]]])
            ZY = np.concatenate([ZqY, Zb["train"].T @ Y])
            Z = {s: np.concatenate([Zq[s], Zb[s]], 1) for s in rows}
            with_block[k] = _fits(Z, G, ZY, group, group["offsets"])
    return question, with_block


def _refit_targets(group: dict, size: int) -> dict:
    """The group's training targets restricted to its first `size` training rows."""
    keep = group["rows"]["train"] < size
    Y = group["Y"][keep] + group["y_mean"]
    targets = {
        t: (schema, _Targets(tr.rows[keep], [c[keep] for c in tr.columns], tr.onehot[keep],
                             None if tr.angles is None else tr.angles[keep],
                             None if tr.value is None else tr.value[keep]), va, te)
        for t, (schema, tr, va, te) in group["targets"].items()
    }  # fmt: skip
    return {"targets": targets, "y_mean": Y.mean(0), "Y": (Y - Y.mean(0)).astype(np.float32)}


@dataclass
class _Split:
    """One split's examples and their states at the probed layers."""

    examples: list[Example]
    blocks: np.ndarray  # [n, layers, K, slots, d]
    question: np.ndarray  # [n, layers, Q, d]
    groups: np.ndarray

    def question_features(self, li: int, width: int) -> np.ndarray:
        q = self.question[:, li, :width]
        if q.shape[1] < width:  # a split whose questions are all shorter
            q = np.pad(q, ((0, 0), (0, width - q.shape[1]), (0, 0)))
        return q.reshape(len(q), -1)

    def block_features(self, li: int, block: int) -> np.ndarray:
        return self.blocks[:, li, block - 1].reshape(len(self.blocks), -1)


def _split(lab: Session, examples: Sequence[Example], layers: list[int]) -> _Split:
    blocks, question = question_and_block_states(lab.backend, lab.builder, list(examples), layers)
    groups = np.unique([lab.task.key(ex.question) for ex in examples], return_inverse=True)[1]
    return _Split(list(examples), blocks.float().numpy(), question.float().numpy(), groups)


def conditional_probe(
    lab: Session, sel: Selection, train: Sequence[Example], validation: Sequence[Example], seed: int = 0
) -> ConditionalResult:
    """Conditional probes per (layer, block, step) of the selection (module docstring): fitted on
    `train`, penalty, decoder and cell chosen on `validation`, the chosen cell scored on the
    session's examples."""
    if len(train) < 2 or len(validation) < 2:
        raise RunError("conditional probing needs training and validation examples (the run's splits)")
    layers = list(sel.layers)
    splits = {
        name: _split(lab, exs, layers)
        for name, exs in (("train", train), ("val", validation), ("test", lab.examples))
    }
    q_width = splits["train"].question.shape[2]
    steps = range(1, max(len(ex.values) for ex in train) + 1)
    groups = _groups(splits, steps)
    if not groups:
        raise RunError("no step has a value that varies over the training examples: nothing to probe")
    rows, fitted = [], {}
    for group in groups:
        for li, layer in enumerate(layers):
            question, with_block = _probe_layer(splits, group, li, sel.blocks, q_width)
            for k, found in with_block.items():
                for t, qb in found.items():
                    fitted[(layer, k, t)] = (question[t], qb, group)
                    rows.append(_row(layer, k, t, question[t], qb, group))
    table = pd.DataFrame(rows)
    result = ConditionalResult(table)
    result.record = lab.record(
        "conditional",
        sel,
        None,
        seed=seed,
        train=len(train),
        validation=len(validation),
        alphas=list(ALPHAS),
    )
    if table.empty:
        result.summary = {
            "chosen": None,
            "gain": None,
            "note": "every block's states are the same for every example",
        }
        return result
    best = table.loc[table["gain_val"].idxmax()]
    layer, k, t = int(best["layer"]), int(best["block"]), int(best["step"])
    q, qb, group = fitted[(layer, k, t)]
    test_groups = splits["test"].groups[group["rows"]["test"]]
    curve = _curve(splits, group, layers.index(layer), k, t, q_width)
    result.summary = {
        "chosen": {"layer": layer, "block": k, "step": t, "variable": "value", "decoder": qb.decoder},
        "gain": bootstrap(qb.test_hits - q.test_hits, groups=test_groups, seed=seed),
        "question": float(np.mean(q.test_hits)),
        "question_and_block": float(np.mean(qb.test_hits)),
        "curve": curve,
        "n_train": len(train),
        "n_val": len(validation),
        "n_test": len(q.test_hits),
    }
    return result


def _row(layer: int, k: int, t: int, q: _Fit, qb: _Fit, group: dict) -> dict:
    """The table row of one (layer, block, step): the [question; block] probe beside the question's."""
    return {
        "layer": layer, "block": k, "step": t,
        "question_val": q.val, "question_and_block_val": qb.val,
        "gain_val": qb.val - q.val,
        "decoder": qb.decoder, "decoder_question": q.decoder,
        "angles_r2_val": qb.angles_r2, "angles_r2_question_val": q.angles_r2,
        "value_r2_val": qb.value_r2, "value_r2_question_val": q.value_r2,
        "alpha": qb.alpha, "alpha_question": q.alpha,
        "n_train": len(group["rows"]["train"]), "n_val": len(group["rows"]["val"]),
    }  # fmt: skip


def _curve(splits: dict[str, _Split], group: dict, li: int, k: int, t: int, q_width: int) -> dict[int, float]:
    """The chosen cell's learning curve: its test gain over the question alone, fitted on the first
    `size` training rows for each size of `CURVE` up to the training split's."""
    curve = {}
    for size in CURVE:
        if size <= len(splits["train"].examples):
            c_q, c_qb = _probe_layer(splits, group, li, [k], q_width, size)
            if k in c_qb:
                curve[size] = float(np.mean(c_qb[k][t].test_hits) - np.mean(c_q[t].test_hits))
    return curve


@dataclass(repr=False)
class ConditionalResult(Result):
    """Conditional probes: per (layer, block, step) the validation score (mean digit accuracy) of
    the probe on the question's states and on [question; block], their difference (`gain_val`),
    the decoder and penalty chosen, and the R^2 of the angle and value encodings; the chosen
    cell's test gain (an Estimate, bootstrap over question groups) and learning curve in the
    summary."""

    name: ClassVar[str] = "probe_conditional"

    def figures(self) -> dict[str, go.Figure]:
        if self.table.empty:
            return {}
        best = self.table.sort_values("gain_val").groupby(["layer", "block"], as_index=False).last()
        title = "Conditional probe: what the block adds to the question's states (validation)"
        return {"probe_conditional.gain": figures.layer_block_heatmap(best, "gain_val", title, zmid=0)}


def gain(summary: dict | None) -> Estimate | None:
    """The chosen cell's test gain of a conditional probe's summary (None: not run). A model none
    of whose cells could be probed gains nothing: 0, still a figure to compare with."""
    if not summary:
        return None
    found = summary.get("gain")
    if found is None:
        return Estimate(0.0, 0.0, 0.0, 0, "none probed")
    return found if isinstance(found, Estimate) else Estimate.from_dict(found)


def probe_sets(lab: Session, split: str = "test") -> tuple[list[Example], list[Example]] | None:
    """The examples conditional probes are fitted on (the first `conditional.TRAIN` of the run's
    training split) and chosen on (the first `conditional.VALIDATION` of its validation split, or
    of its test split when the report reads validation); None for a run without those splits."""
    if lab.run is None:
        return None
    chosen_on = "test" if split == "val" else "val"
    found = []
    for name, size in (("train", TRAIN), (chosen_on, VALIDATION)):
        path = artefacts.split_path(lab.run.path, name)
        if not path.exists():
            return None
        examples, _ = read_examples(path, lab.task.name, task_options=lab.task.options)
        found.append(examples[:size])
    return found[0], found[1]
