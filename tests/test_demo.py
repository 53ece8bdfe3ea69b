"""The demo's verdict on the comparison: the gap check on intervals, the K curve and the seeds table."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.demo import gap_closure, k_curve, seed_table, verdict_table


def _m(accuracy: float, lo: float, hi: float, **more) -> dict:
    return {"accuracy": accuracy, "accuracy_ci": [lo, hi], **more}


@pytest.mark.parametrize(
    ("rim", "pause", "closed", "above_mid", "above_pause"),
    [
        (_m(0.33, 0.29, 0.37), _m(0.24, 0.20, 0.28), 0.24, False, True),  # the demo: beats pause only
        (_m(0.80, 0.76, 0.84), _m(0.30, 0.26, 0.34), 0.86, True, True),  # clears both bars
        (_m(0.60, 0.55, 0.65), _m(0.58, 0.53, 0.63), 0.60, True, False),  # RiM = control: not evidence
    ],
)
def test_gap_closure_compares_interval_bounds(rim, pause, closed, above_mid, above_pause):
    metrics = {"direct": _m(0.15, 0.12, 0.18), "cot": _m(0.90, 0.87, 0.93), "rim": rim, "pause": pause}
    gap = gap_closure(metrics)
    assert gap["closed"] == pytest.approx((rim["accuracy"] - 0.15) / 0.75, abs=0.01)
    assert gap["closed"] == pytest.approx(closed, abs=0.01)
    assert gap["midpoint"] == pytest.approx(0.525)
    assert gap["rim_lo_above_midpoint"] is above_mid and gap["rim_lo_above_pause_hi"] is above_pause
    assert gap_closure({"rim": rim, "pause": pause}) is None  # nothing to close without direct and CoT


def test_k_curve_and_seed_table():
    curve = k_curve({"per_block_accuracy": [0.2, 0.3], "per_block_accuracy_ci": [[0.1, 0.3], [0.2, 0.4]]})
    assert curve.splitlines()[2:] == ["| 1 | 0.200 [0.100, 0.300] |", "| 2 | 0.300 [0.200, 0.400] |"]
    table = seed_table({"rim": [0.3, 0.5, 0.4], "direct": [0.1]})
    assert "| rim | 0.400 ± 0.100 | 3 |" in table and "| direct | 0.100 ± 0.000 | 1 |" in table
    assert table.startswith("| method | test accuracy") and "| val accuracy" in seed_table(
        {"rim": [0.3]}, "val"
    )


def test_verdict_table_judges_every_seed_on_its_own_runs():
    """A seed clears the bar against its own direct, CoT and pause runs, not the seed-0 ones."""
    seeds = [
        {"direct": _m(0.3, 0.26, 0.34), "cot": _m(0.99, 0.98, 1.0), "pause": _m(0.3, 0.26, 0.34),
         "rim": _m(0.95, 0.93, 0.97)},  # clears: 0.93 > midpoint 0.645 and > pause 0.34
        {"direct": _m(0.3, 0.26, 0.34), "cot": _m(0.99, 0.98, 1.0), "pause": _m(0.3, 0.26, 0.34),
         "rim": _m(0.45, 0.41, 0.49)},  # below the midpoint
        {"direct": _m(0.1, 0.08, 0.13), "cot": _m(0.9, 0.87, 0.92), "pause": _m(0.7, 0.66, 0.74),
         "rim": _m(0.72, 0.68, 0.76)},  # above its midpoint (0.5) but not above its pause
        {"direct": _m(0.1, 0.08, 0.13), "rim": _m(0.72, 0.68, 0.76)},  # no CoT: not judged
    ]  # fmt: skip
    table = verdict_table(seeds)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.rstrip(" |").rsplit("| ", 1)[-1] for row in rows] == ["yes", "no", "no", "–"]
    assert table.splitlines()[-1] == "RiM clears the bar on 1 of 3 seeds."


def test_no_gap_when_cot_does_not_beat_direct():
    metrics = {"direct": _m(0.01, 0.0, 0.04), "cot": _m(0.0, 0.0, 0.02), "rim": _m(0.015, 0.005, 0.04)}
    assert gap_closure(metrics) == {
        "closed": None,
        "note": "CoT is not above direct: there is no gap to close",
    }


def test_data_files_with_the_same_bytes_are_the_same_recipe(tmp_path):
    """A runs folder moved or copied keeps its data under a new path: the demo reuses its runs."""
    from training.config import differences, load_config

    recipe = Path(__file__).resolve().parents[1] / "training/recipes/demo.yaml"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, text in (("a", "same"), ("b", "same")):
        (tmp_path / folder / "train.jsonl").write_text(text)
    (tmp_path / "other.jsonl").write_text("different")
    at = lambda path: load_config(recipe, [f"data.train={path}"])  # noqa: E731
    assert differences(at(tmp_path / "a/train.jsonl"), at(tmp_path / "b/train.jsonl")) == []
    assert differences(at(tmp_path / "a/train.jsonl"), at(tmp_path / "other.jsonl")) == ["data.train"]


@pytest.mark.parametrize(
    "method, key, value, changed",
    [
        ("direct", "train.stage1_fraction", "0.4", False),
        ("pause", "train.lambda_hold", "0.9", False),
        ("cot", "coconut.c", "3", False),
        ("rim", "train.stage1_fraction", "0.4", True),
        ("pause", "train.alpha", "uniform", True),
        ("coconut", "coconut.c", "3", True),
        ("direct", "train.lr", "2.0e-3", True),
    ],
)
def test_a_key_only_other_methods_read_is_no_change_of_recipe(method, key, value, changed):
    """Moving RiM's schedule in a demo retrains RiM, not the baselines that never read it."""
    from training.config import differences, load_config

    recipe = Path(__file__).resolve().parents[1] / "training/recipes/demo.yaml"
    base = load_config(recipe, [f"method={method}"])
    moved = load_config(recipe, [f"method={method}", f"{key}={value}"])
    assert differences(moved, base) == ([key] if changed else [])
