"""The causal report card: `build_report` on a RiM run with its pause control and direct
baseline writes analysis/report.json and report.md with every number in range."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rim_lens.analysis.report import KEYS, build_report

torch.set_num_threads(1)

N = 32
CARD_KEYS = {
    "accuracy_intact",
    "accuracy_all_blocks_ablated",
    "accuracy_direct_baseline",
    "interchange_transfer_rate",
    "best_value_probe_selectivity",
    "correctness_probe_auroc",
    "patching_peak",
}


def strict_json(path) -> dict:
    """Parse refusing NaN / Infinity, which strict JSON readers (browsers) reject."""

    def bad(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=bad)


def unit(x) -> bool:
    return isinstance(x, float | int) and 0 <= x <= 1


@pytest.fixture(scope="module")
def report(tiny_modchain_runs, tmp_path_factory):
    from fixtures import clone_runs

    runs = clone_runs(tiny_modchain_runs, tmp_path_factory.mktemp("report"))
    return runs, build_report(runs["rim"], control=runs["pause"], direct=runs["direct"], n=N)


def test_report_files(report):
    runs, rep = report
    out = runs["rim"] / "analysis"
    saved = strict_json(out / "report.json")
    assert saved == json.loads(json.dumps(rep))
    assert set(saved) == {"run", "control", "verdict"}
    md = (out / "report.md").read_text()
    assert md.startswith("# Do the memory blocks carry the reasoning?")
    assert saved["verdict"] in md
    for key in KEYS:
        assert f"| {key} |" in md
    # Every analysis behind the card is saved, for the run and for its control.
    for run in ("rim", "pause"):
        for name in ("ablate", "knockout", "interchange", "patch", "probe_correctness", "probe_values"):
            assert (runs[run] / "analysis" / f"{name}.parquet").exists(), (run, name)
        assert (runs[run] / "analysis" / "capture" / "meta.json").exists()
    assert not (runs["pause"] / "analysis" / "report.json").exists()


@pytest.mark.parametrize("which", ["run", "control"])
def test_report_card_values_are_in_range(report, which):
    runs, rep = report
    card = rep[which]
    assert CARD_KEYS <= set(card)
    assert card["method"] == ("rim" if which == "run" else "pause")
    # The run's path, absolute or relative to the reported run.
    assert (runs["rim"] / card["run"]).resolve() == runs["rim" if which == "run" else "pause"].resolve()
    assert card["n"] == N
    for key in (
        "accuracy_intact",
        "accuracy_all_blocks_ablated",
        "accuracy_direct_baseline",
        "interchange_transfer_rate",
    ):
        assert unit(card[key]), (key, card[key])
    direct = json.loads((runs["direct"] / "metrics.json").read_text())["accuracy"]
    assert card["accuracy_direct_baseline"] == direct
    auroc = card["correctness_probe_auroc"]
    assert auroc is None or unit(auroc)
    sel = card["best_value_probe_selectivity"]
    assert sel is None or (math.isfinite(sel) and -1 <= sel <= 1)
    peak = card["patching_peak"]
    assert 0 <= peak["layer"] < 2 and 1 <= peak["block"] <= 2  # tiny preset: 2 layers; K = 2
    assert math.isfinite(peak["recovery"])
    # Intact accuracy is teacher-forced; it must match greedy decoding on the same examples.
    run = runs["rim" if which == "run" else "pause"]
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert card["accuracy_intact"] == pytest.approx(sum(p["correct"] for p in predictions[:N]) / N)


def test_report_verdict(report):
    _, rep = report
    verdict = rep["verdict"]
    assert isinstance(verdict, str) and verdict.endswith(".")
    run = rep["run"]
    if run["accuracy_intact"] > (run["chance_accuracy"] or 0) + 0.05:
        assert "Necessity:" in verdict and "Location:" in verdict and "What this does not show" in verdict
        assert "ungrounded control (pause)" in verdict
    else:
        assert "at chance" in verdict


def test_report_on_a_task_that_cannot_be_corrupted(tiny_runs_copy):
    """GSM8K-format runs (here the copy task) have no clean/corrupt pairs: the report still
    comes out, with the patching peak null and a note saying why."""
    runs = tiny_runs_copy
    rep = build_report(runs["rim"], n=24)  # control and direct: the sibling pause and direct runs
    assert rep["control"]["method"] == "pause"
    for card in (rep["run"], rep["control"]):
        assert card["patching_peak"] is None and "cannot corrupt" in card["patching_note"]
        assert unit(card["accuracy_intact"]) and unit(card["accuracy_direct_baseline"])
    # The copy-task RiM routes its answer through its blocks; its pause control ignores them.
    assert rep["run"]["accuracy_intact"] - rep["run"]["accuracy_all_blocks_ablated"] >= 0.4
    assert rep["control"]["accuracy_intact"] - rep["control"]["accuracy_all_blocks_ablated"] <= 0.05
    assert "activation patching was not run" in rep["verdict"]
    assert "so the answers depend on the block states" in rep["verdict"]
    saved = strict_json(runs["rim"] / "analysis" / "report.json")
    assert saved["run"]["patching_peak"] is None
