"""The causal report: `build_report` on a RiM run with its pause control and direct baseline
writes analysis/report.json and report.md: a card of figures with 95% intervals, measured the same
way on the same examples for every run, and the verdict as four findings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rim_lens.analysis.card import CARD, KEYS
from rim_lens.analysis.report import build_report
from rim_lens.analysis.verdict import FINDINGS, NOT_TESTABLE, OUTCOMES

torch.set_num_threads(1)

N = 32
ESTIMATES = {
    "accuracy_intact",
    "accuracy_all_blocks_ablated",
    "ablation_drop",
    "accuracy_answer_sees_no_block",
    "interchange_transfer_rate",
}


def strict_json(path) -> dict:
    """Parse refusing NaN / Infinity, which strict JSON readers (browsers) reject."""

    def bad(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=bad)


def interval(e) -> bool:
    """An Estimate saved as a dict: value inside [lo, hi] (proportions within [0, 1])."""
    return isinstance(e, dict) and e["lo"] - 1e-9 <= e["value"] <= e["hi"] + 1e-9 and e["n"] > 0


def predictions(run, n):
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()][:n]


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
    assert set(saved) == {"run", "control", "compared", "findings", "verdict", "calibration"}
    assert saved["compared"] == [], "no coconut run beside these"
    md = (out / "report.md").read_text()
    assert md.startswith("# Do the memory blocks carry the reasoning?")
    for line in saved["verdict"].splitlines():
        assert line in md
    for row in CARD:  # every figure, with how it was measured
        assert f"| {row.key} | {row.how} |" in md
    for name in FINDINGS:
        assert f"| {name} | **" in md
    # The report cites what was done: the intervention and selection of each analysis.
    assert "run, ablate: " in md and "intervention `{'kind': 'mean'}`" in md
    assert "control, interchange: " in md and "'kind': 'patch'" in md
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
    assert set(KEYS) - {"accuracy_direct_baseline"} <= set(card)
    assert card["method"] == ("rim" if which == "run" else "pause")
    # The run's path, absolute or relative to the reported run.
    assert (runs["rim"] / card["run"]).resolve() == runs["rim" if which == "run" else "pause"].resolve()
    assert card["n"] == N
    for key in ESTIMATES:
        assert interval(card[key]), (key, card[key])
    auroc = card["correctness_probe_auroc"]
    assert auroc is None or 0 <= auroc <= 1
    sel = card["best_value_probe_selectivity"]
    assert sel is None or (interval(sel) and -1 <= sel["value"] <= 1)
    peak = card["patching_peak"]
    assert 0 <= peak["layer"] < 2 and 1 <= peak["block"] <= 2  # tiny preset: 2 layers; K = 2
    assert math.isfinite(card["patching_peak_recovery"]["value"])
    # Attribution patching beside it, saved, with its rank agreement over cells (a percentile
    # bootstrap interval of a correlation need not contain the point value).
    rho = card["patching_attribution_spearman"]
    if rho is None:  # tiny preset: 2 layers x 2 blocks, and layer 0 cannot change the metric
        assert "a rank correlation needs 3" in card["patching_attribution_note"]
    else:
        assert -1 <= rho["lo"] <= rho["hi"] <= 1 and -1 <= rho["value"] <= 1 and rho["n"] > 0
    analysis = runs["rim" if which == "run" else "pause"] / "analysis"
    assert (analysis / "patch_attribution.parquet").exists() and "patch_attribution" in card["done"]
    # Intact accuracy is teacher-forced; it equals greedy decoding on the same examples.
    run = runs["rim" if which == "run" else "pause"]
    expected = sum(p["correct"] for p in predictions(run, N)) / N
    assert card["accuracy_intact"]["value"] == pytest.approx(expected)
    assert card["accuracy_intact"]["method"] == "wilson" and card["ablation_drop"]["method"] == "bootstrap"


def test_report_compares_like_with_like(report):
    """The direct baseline and the control are measured the same way on the run's examples."""
    runs, rep = report
    direct = rep["run"]["accuracy_direct_baseline"]
    assert interval(direct) and direct["n"] == N
    assert direct["value"] == pytest.approx(sum(p["correct"] for p in predictions(runs["direct"], N)) / N)
    assert rep["control"]["examples"] == f"the same {N} examples as the run"
    for card in (rep["run"], rep["control"]):
        assert card["done"]["ablate"]["intervention"] == {"kind": "mean"}
        assert card["done"]["ablate"]["selection"]["blocks"] == [1, 2]


def test_report_verdict(report):
    _, rep = report
    assert [f["name"] for f in rep["findings"]] == list(FINDINGS)
    for f in rep["findings"]:
        assert f["outcome"] in OUTCOMES and f["detail"]
        assert all(interval(e) for e in f["run"].values())
    lines = rep["verdict"].splitlines()
    assert lines[0].startswith("Necessity:") and lines[3].startswith("Location:")
    assert "What this does not show" in lines[-1]
    # This RiM's readout cannot see the question: necessity and sufficiency hold by construction.
    found = {f["name"]: f for f in rep["findings"]}
    assert found["necessity"]["outcome"] == NOT_TESTABLE and "by construction" in found["necessity"]["detail"]
    assert found["sufficiency"]["outcome"] == NOT_TESTABLE
    assert any(line.startswith("Caveat: this model's readout cannot see the question") for line in lines)


def test_report_on_a_task_that_cannot_be_corrupted(tiny_runs_copy):
    """GSM8K-format runs (here the copy task) have no clean/corrupt pairs: the report still
    comes out, with the patching peak null and a note saying why."""
    runs = tiny_runs_copy
    rep = build_report(runs["rim"], n=24)  # control and direct: the sibling pause and direct runs
    assert rep["control"]["method"] == "pause"
    for card in (rep["run"], rep["control"]):
        assert card["patching_peak"] is None and "cannot corrupt" in card["patching_note"]
        assert interval(card["accuracy_intact"]) and interval(
            card["accuracy_direct_baseline"] or card["accuracy_intact"]
        )
    # The copy-task RiM routes its answer through its blocks; its pause control ignores them.
    run, control = rep["run"], rep["control"]
    assert run["accuracy_intact"]["value"] - run["accuracy_all_blocks_ablated"]["value"] >= 0.4
    assert control["accuracy_intact"]["value"] - control["accuracy_all_blocks_ablated"]["value"] <= 0.05
    assert run["ablation_drop"]["lo"] > control["ablation_drop"]["hi"]
    found = {f["name"]: f for f in rep["findings"]}
    assert found["location"]["outcome"] == NOT_TESTABLE
    assert "activation patching was not run" in rep["verdict"]
    assert "so the answers depend on the block states" in rep["verdict"]
    saved = strict_json(runs["rim"] / "analysis" / "report.json")
    assert saved["run"]["patching_peak"] is None


def test_report_grids_cover_the_chosen_layers(tiny_runs_copy):
    """`layers` (a deep pretrained model's way to a report in reasonable time) limits the per-layer
    grids; ablation and knockout still cover every layer, so "every block ablated" keeps its meaning."""
    runs = tiny_runs_copy
    rep = build_report(runs["rim"], n=16, layers=[1])
    for card in (rep["run"], rep["control"]):
        done = card["done"]
        assert done["interchange"]["selection"]["layers"] == [1]
        assert done["probe"]["selection"]["layers"] == [1]
        assert len(done["ablate"]["selection"]["layers"]) > 1
        assert len(done["knockout"]["selection"]["layers"]) > 1
