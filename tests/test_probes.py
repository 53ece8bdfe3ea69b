"""Probes on a hand-written capture with planted signals: found where planted, nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, roc_auc_score

from rim_lens.analysis.capture import CaptureStore
from rim_lens.analysis.probes import (
    ProbeResult,
    probe_correctness,
    probe_values,
    select_answers,
    value_probes,
)
from rim_lens.analysis.probing import (
    CONSTANT,
    MIN_EXAMPLES_PER_TYPE,
    control_labels,
    control_types,
    question_groups,
    weighted_ranking,
)
from rim_lens.errors import RunError

N, LAYERS, K, SLOTS, D = 240, [0, 1], 3, ["<b>", "</b>"], 6
FAST = dict(folds=4, n_boot=200)


def write_capture(
    path: Path, resid: np.ndarray, records: list[dict], layers: list[int], slots: list[str]
) -> CaptureStore:
    """A capture directory in capture.py's format: two shards, examples.jsonl, meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    n, half, shards = len(records), len(records) // 2, []
    for i, (a, b) in enumerate([(0, half), (half, n)]):
        name = f"shard_{i:05d}.safetensors"
        save_file({"resid": torch.from_numpy(resid[a:b]).float(), "index": torch.arange(a, b)}, path / name)
        shards.append(name)
    (path / "examples.jsonl").write_text(
        "".join(json.dumps({"index": i, **r}) + "\n" for i, r in enumerate(records))
    )
    meta = {
        "n": n,
        "layers": layers,
        "attn_layers": [],
        "K": resid.shape[2],
        "M": len(slots) - 2,
        "slots": slots,
        "d_model": resid.shape[-1],
        "n_layers": max(layers),
        "backend": "hf",
        "task": "synthetic",
        "method": "rim",
        "dtype": "float32",
        "shards": shards,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return CaptureStore(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> CaptureStore:
    """Noise everywhere, except: layer 1 block 2 linearly encodes values[1] (5 classes), and
    layer 1 block 3 encodes whether the readout after block 3 was correct. The question's
    first word (the control type) is independent of both; a fifth of the examples have no step 2."""
    rng = np.random.default_rng(0)
    resid = rng.normal(size=(N, len(LAYERS), K, len(SLOTS), D)).astype(np.float32)
    v1, v2 = rng.integers(5, size=N), rng.integers(5, size=N)
    correct = rng.random((N, K)) < 0.4
    codes = rng.normal(size=(5, len(SLOTS), D))
    resid[:, 1, 1] += 3 * codes[v2]
    resid[:, 1, 2, :, 0] += 3 * correct[:, 2, None]
    words = list("abcdefgh")
    records = []
    for i in range(N):
        values = [int(v1[i])] + ([int(v2[i])] if i % 5 else [])
        records.append(
            {
                "id": f"x{i}",
                "question": f"{words[rng.integers(8)]} q{i}",
                "answer": "0",
                "steps": [str(v) for v in values],
                "values": values,
                "readouts": ["0"] * K,
                "correct": correct[i].tolist(),
            }
        )
    return write_capture(tmp_path_factory.mktemp("planted"), resid, records, LAYERS, SLOTS)


def test_value_probe_finds_planted_step_only_there(planted):
    df = probe_values(planted, **FAST)
    assert len(df) == len(LAYERS) * K * 2 and set(df["target"]) == {"value"}
    assert (df.loc[df["step"] == 2, "n"] == N - N // 5).all()
    hit = (df["layer"] == 1) & (df["block"] == 2) & (df["step"] == 2)
    cell = df[hit].iloc[0]
    assert cell["score"] > 0.9 and cell["score_lo"] <= cell["score"] <= cell["score_hi"]
    # The control (first word: 8 types of 30 examples) has a skewed class balance, so it scores
    # its majority rate (~0.4) even on noise: selectivity is below score - 1/5.
    assert cell["selectivity"] > 0.4 and cell["control"] < cell["control_chance"] + 0.15
    rest = df[~hit]
    assert (rest["score"] < rest["chance"] + 0.15).all()
    assert (rest["selectivity"] < 0.2).all()
    # The control task (labels by first word) cannot be read from states that ignore that word.
    assert (df["control"] < df["control_chance"] + 0.15).all()


def test_correctness_probe_finds_planted_block(planted):
    df = probe_correctness(planted, **FAST)
    assert list(df.columns[:2]) == ["layer", "block"] and len(df) == len(LAYERS) * K
    hit = (df["layer"] == 1) & (df["block"] == 3)
    cell = df[hit].iloc[0]
    assert cell["auroc"] > 0.9 and cell["auroc_lo"] <= cell["auroc"] <= cell["auroc_hi"]
    assert cell["auprc"] > 0.8 and cell["selectivity"] > 0.3
    assert (df.loc[~hit, "auroc"] < 0.7).all()
    assert (df["control_auroc"] < 0.75).all()


def test_correctness_probe_one_slot_and_deterministic(planted):
    a = probe_correctness(planted, layers=[1], blocks=[3], slots=1, **FAST)
    b = probe_correctness(planted, layers=[1], blocks=[3], slots=[1], **FAST)
    assert a.equals(b) and a["slot"].tolist() == [1]
    assert a["auroc"].iloc[0] > 0.9


def test_single_class_cell_is_skipped_with_a_reason(tmp_path):
    rng = np.random.default_rng(1)
    records = [
        {
            "id": str(i),
            "question": f"w{i % 20 % 3} q{i % 20}",
            "answer": "1",
            "steps": ["1"],
            "values": [1],
            "readouts": ["1", "1"],
            "correct": [False, bool(i % 2)],
        }
        for i in range(40)
    ]
    store = write_capture(tmp_path, rng.normal(size=(40, 1, 2, 2, 4)).astype(np.float32), records, [1], SLOTS)
    assert len(np.unique(question_groups(store))) == 20  # repeated questions share a group
    df = probe_correctness(store, **FAST)
    assert np.isnan(df["auroc"].iloc[0]) and "all wrong" in df["note"].iloc[0]
    assert not np.isnan(df["auroc"].iloc[1])
    values = probe_values(store, **FAST)  # every example has the value 1
    assert values["score"].isna().all() and values["note"].str.contains("same value").all()
    with pytest.raises(RunError, match="block 3 out of range"):
        probe_correctness(store, blocks=[3])


def test_large_integers_are_probed_by_digit(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.integers(10**4, 10**6, size=60)
    records = [
        {
            "id": str(i),
            "question": f"q{i}",
            "answer": "0",
            "steps": ["s"],
            "values": [int(v)],
            "readouts": ["0"],
            "correct": [bool(i % 2)],
        }
        for i, v in enumerate(big)
    ]
    resid = rng.normal(size=(60, 1, 1, 2, 4)).astype(np.float32)
    resid[:, 0, 0, 0, :] += 4 * np.eye(10)[big % 10][:, :4]  # digit 0 is (partly) readable
    df = probe_values(write_capture(tmp_path, resid, records, [0], SLOTS), **FAST)
    assert df["target"].iloc[0] == "digits 0,1,2 (mean acc)"
    assert 0 <= df["score"].iloc[0] <= 1


def test_select_answers_baselines():
    class Store:  # select_answers needs only correct() when given probabilities
        def correct(self):
            return np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=bool)

    store = Store()
    oracle = select_answers(store, store.correct() + 0.1 * np.arange(3))  # ties broken, right block wins
    assert oracle["selected_when_any"] == 1.0 and oracle["n_any"] == 3
    assert oracle["final_block"] == 0.5 and oracle["any_block"] == 0.75
    assert oracle["random_block"] == pytest.approx(4 / 12)
    assert oracle["random_block_when_any"] == pytest.approx(4 / 9)
    flat = select_answers(store, np.zeros((4, 3)))  # no preference: the final block
    assert flat["selected"] == flat["final_block"]


def test_select_answers_from_table_uses_best_layer(planted):
    df = probe_correctness(planted, **FAST)
    out = select_answers(planted, df, folds=4)
    assert out["layer"] == 1 and out["n"] == N
    # The probe recognises block 3's right answers, so choosing by it beats both baselines.
    assert out["selected_when_any"] > out["random_block_when_any"] + 0.15
    assert out["selected_when_any"] > out["final_block_when_any"] + 0.2


def test_weighted_ranking_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.random(50) < 0.3
    p = np.round(rng.random(50), 1)  # ties
    w = rng.integers(0, 3, size=(4, 50)).astype(float)
    got = weighted_ranking(y, p, w)
    for b in range(4):
        assert got[b, 0] == pytest.approx(roc_auc_score(y, p, sample_weight=w[b]))
        assert got[b, 1] == pytest.approx(average_precision_score(y, p, sample_weight=w[b]))


def test_groups_and_control_labels(planted):
    groups = question_groups(planted)
    assert len(np.unique(groups)) == N  # every question distinct
    types = np.array(["a", "b", "a", "c", "b", "a"])
    y = np.array([0, 1, 2, 0, 1, 2])
    labels = control_labels(y, types, np.random.default_rng(0))
    assert labels[0] == labels[2] == labels[5] and labels[1] == labels[4]
    assert set(labels) <= set(y) and len(set(labels)) > 1


def test_value_probes_in_parallel_equal_one_process(planted):
    """Cells fitted in worker processes give the same table and per-example hits as in order here."""
    one_table, one_hits = value_probes(planted, n_jobs=1, **FAST)
    two_table, two_hits = value_probes(planted, n_jobs=2, **FAST)
    pd.testing.assert_frame_equal(one_table, two_table)
    assert one_hits.keys() == two_hits.keys()
    for key, outcomes in one_hits.items():
        for a, b in zip(outcomes, two_hits[key]):
            np.testing.assert_array_equal(a, b)


def test_best_value_probe_is_chosen_on_some_examples_and_scored_on_others(planted):
    table, hits = value_probes(planted, **FAST)
    result = ProbeResult(table, hits=hits, groups=question_groups(planted))
    best = result.best()
    assert (best["layer"], best["block"], best["step"]) == (1, 2, 2)
    assert best["selectivity"].lo > 0.4 and best["selectivity"].n == N - N // 5
    first, second = np.arange(N // 2), np.arange(N // 2, N)
    split = result.best(select_on=first, score_on=second)
    assert (split["layer"], split["block"], split["step"]) == (1, 2, 2)
    rows = hits[(1, 2, "value", 2)][0]
    assert split["selectivity"].n == np.isin(rows, second).sum()
    # Chosen where it looks best, scored where it was not chosen: a cell that wins on the first
    # half only is reported with its (poor) second-half selectivity.
    rows = np.arange(10)
    lucky = (rows, np.r_[np.ones(5), np.zeros(5)], np.zeros(10))
    steady = (rows, np.full(10, 0.6), np.full(10, 0.2))
    result = ProbeResult(
        table, hits={(0, 1, "value", 1): lucky, (0, 2, "value", 1): steady}, groups=np.arange(10)
    )
    picked = result.best(select_on=rows[:5], score_on=rows[5:])
    assert (picked["block"], picked["selectivity"].value) == (1, 0.0)
    assert result.best(select_on=rows[5:], score_on=rows[5:])["block"] == 2


def test_control_types_recur_often_enough_to_be_learned():
    examples = [{"question": f"{i % 4} {i % 20} {i}"} for i in range(400)]
    types = control_types(examples)
    # Two words give 20 types of 20 examples; three would make every question its own type.
    assert len(set(types)) == 20 and len(types) / len(set(types)) >= MIN_EXAMPLES_PER_TYPE
    assert len(set(control_types(examples[:100]))) == 4  # 100 examples: one word, 25 per type


def one_step_records(
    first: np.ndarray, value: np.ndarray, correct: np.ndarray, derived: list[dict] | None = None
) -> list[dict]:
    """Capture records of one-step examples: question `w<first> x<i>` (its first word is the
    control type), the step's value, whether the one readout was right, derived values if given."""
    return [
        {
            "id": f"e{i}",
            "question": f"w{first[i]} x{i}",
            "answer": "0",
            "steps": ["s"],
            "values": [int(value[i])],
            **({"derived": derived[i]} if derived else {}),
            "readouts": ["0"],
            "correct": [bool(correct[i])],
        }
        for i in range(len(value))
    ]


def test_control_task_is_learnable_when_states_hold_the_type(tmp_path):
    """States that encode the control type (the question's first word): the control task is
    learned out of fold, far above its chance, so a real probe's selectivity is judged against a
    control the probe could learn."""
    rng = np.random.default_rng(1)
    n = 300
    first = rng.integers(10, size=n)
    value = rng.integers(5, size=n)
    resid = rng.normal(size=(n, 1, 1, 2, 8)).astype(np.float32)
    resid[:, 0, 0, :, :] += 3 * rng.normal(size=(10, 2, 8))[first]  # the first word, readable
    derived = [{"running_total": [int(v) + 1], "copy": [int(v)]} for v in value]
    records = one_step_records(first, value, np.zeros(n, dtype=bool), derived)
    store = write_capture(tmp_path / "c", resid, records, [0], ["<b>", "</b>"])
    df = probe_values(store, **FAST)
    assert set(df["variable"]) == {"value", "running_total", "copy"}  # derived values, own names
    # A derived quantity equal to the step's value is the same problem, with the same control.
    figures = ["score", "control", "selectivity", "score_lo", "score_hi"]
    copy = df[df["variable"] == "copy"][figures].to_numpy()
    np.testing.assert_array_equal(copy, df[df["variable"] == "value"][figures].to_numpy())
    assert (df["n_types"] == 10).all()
    row = df[df["variable"] == "value"].iloc[0]
    assert row["control"] > row["control_chance"] + 0.3  # the control task is learnable here
    assert row["selectivity"] < 0.2  # and the value, not encoded, is not selectively readable


def test_states_equal_for_every_example_are_not_probed(tmp_path):
    """Layer 0 at a block token holds its embedding, the same for every question: its cells are
    NaN with a note, and the best cell is chosen among the others."""
    rng = np.random.default_rng(2)
    n = 200
    value = rng.integers(4, size=n)
    resid = rng.normal(size=(n, 2, 1, 2, 6)).astype(np.float32)
    resid[:, 0] = 1.0  # every example the same at layer 0
    resid[:, 1, 0, :, 0] += 3 * value[:, None]
    correct = rng.random(n) < 0.5
    records = one_step_records(np.arange(n) % 10, value, correct)
    store = write_capture(tmp_path / "c", resid, records, [0, 1], ["<b>", "</b>"])
    table, hits = value_probes(store, **FAST)
    first = table[table["layer"] == 0].iloc[0]
    assert np.isnan(first["score"]) and first["note"] == CONSTANT
    assert table[table["layer"] == 1].iloc[0]["score"] > 0.5  # four values: chance is about 0.25
    assert [key[0] for key in hits] == [1]
    best = ProbeResult(table, hits=hits, groups=question_groups(store)).best()
    assert best["layer"] == 1
    correctness = probe_correctness(store, **FAST)
    assert correctness[correctness["layer"] == 0].iloc[0]["note"] == CONSTANT
