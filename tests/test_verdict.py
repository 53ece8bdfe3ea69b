"""The verdict, table-driven on hand-built cards: each finding compares interval bounds, never
points, and a RiM run that merely equals its control is never called evidence."""

from __future__ import annotations

import pytest

from rim_lens.analysis import verdict
from rim_lens.analysis.verdict import MIN_RECOVERY, NOT_SUPPORTED, NOT_TESTABLE, SUPPORTED
from rim_lens.stats import Estimate, wilson


def est(value: float, half: float = 0.05, n: int = 200) -> dict:
    return Estimate(value, value - half, value + half, n, "test").to_dict()


def card(**figures) -> dict:
    """A card of a RiM run that sees the question, clearly above chance, with every figure set;
    `figures` override (None removes one)."""
    base = {
        "method": "rim",
        "n": 200,
        "chance_accuracy": 0.1,
        "readout_sees_question": True,
        "accuracy_intact": est(0.90),
        "accuracy_all_blocks_ablated": est(0.10),
        "ablation_drop": est(0.80),
        "interchange_transfer_rate": est(0.70),
        "best_value_probe_selectivity": est(0.40),
        "best_value_probe": {"layer": 2, "block": 1, "step": 1},
        "patching_peak_recovery": est(0.80),
        "patching_peak": {"layer": 1, "block": 1},
        "patching_logit_gap": 4.0,
    }
    return {**base, **figures}


def control(**figures) -> dict:
    """An equal control whose blocks carry little: small drop, no transfer, a weak probe."""
    base = card(
        method="pause",
        accuracy_intact=est(0.50),
        accuracy_all_blocks_ablated=est(0.45),
        ablation_drop=est(0.05),
        interchange_transfer_rate=est(0.05),
        best_value_probe_selectivity=est(0.05),
        patching_peak_recovery=est(0.20),
    )
    return {**base, **figures}


SAME = dict(  # a control that matches the run figure for figure
    accuracy_intact=est(0.90),
    accuracy_all_blocks_ablated=est(0.10),
    ablation_drop=est(0.80),
    interchange_transfer_rate=est(0.70),
    best_value_probe_selectivity=est(0.40),
    patching_peak_recovery=est(0.80),
)

CASES = [
    # (case, run card, control card, expected outcomes: necessity, sufficiency, decodability, location)
    ("clear evidence", card(), control(), (SUPPORTED, SUPPORTED, SUPPORTED, SUPPORTED)),
    (
        "RiM equals the control",
        card(),
        control(**SAME),
        (NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED, SUPPORTED),
    ),
    (
        "points differ but intervals overlap",
        card(ablation_drop=est(0.30, 0.15), interchange_transfer_rate=est(0.25, 0.1)),
        control(ablation_drop=est(0.15, 0.1), interchange_transfer_rate=est(0.15, 0.08)),
        (NOT_SUPPORTED, NOT_SUPPORTED, SUPPORTED, SUPPORTED),
    ),
    (
        "ablation does not hurt",
        card(accuracy_all_blocks_ablated=est(0.88), ablation_drop=est(0.02, 0.03)),
        control(),
        (NOT_SUPPORTED, SUPPORTED, SUPPORTED, SUPPORTED),
    ),
    (
        "transfer at chance",
        card(interchange_transfer_rate=est(0.12, 0.04)),
        control(interchange_transfer_rate=est(0.0, 0.0)),
        (SUPPORTED, NOT_SUPPORTED, SUPPORTED, SUPPORTED),
    ),
    ("no control run", card(), None, (NOT_TESTABLE, NOT_TESTABLE, NOT_TESTABLE, SUPPORTED)),
    (
        "model at chance",
        card(accuracy_intact=est(0.12, 0.04)),
        control(),
        (NOT_TESTABLE, NOT_TESTABLE, SUPPORTED, SUPPORTED),
    ),
    (
        "question-blind readout: holds by construction",
        card(readout_sees_question=False),
        control(),
        (NOT_TESTABLE, NOT_TESTABLE, SUPPORTED, SUPPORTED),
    ),
    (
        "probe selective but not beyond zero",
        card(best_value_probe_selectivity=est(0.04, 0.06)),
        control(best_value_probe_selectivity=est(-0.2, 0.05)),
        (SUPPORTED, SUPPORTED, NOT_SUPPORTED, SUPPORTED),
    ),
    (
        "recovery interval reaches below the bar",
        card(patching_peak_recovery=est(0.6, 0.2)),
        control(),
        (SUPPORTED, SUPPORTED, SUPPORTED, NOT_SUPPORTED),
    ),
    (
        "nothing to patch or probe",
        card(patching_peak_recovery=None, patching_peak=None, best_value_probe_selectivity=None),
        control(),
        (SUPPORTED, SUPPORTED, NOT_TESTABLE, NOT_TESTABLE),
    ),
    (
        "clean and corrupt runs not told apart",
        card(patching_logit_gap=0.1),
        control(),
        (SUPPORTED, SUPPORTED, SUPPORTED, NOT_TESTABLE),
    ),
]


@pytest.mark.parametrize("case, run, ctrl, expected", CASES, ids=[c[0] for c in CASES])
def test_findings(case, run, ctrl, expected):
    found = verdict.findings(run, ctrl)
    assert [f.name for f in found] == list(verdict.FINDINGS)
    assert tuple(f.outcome for f in found[:4]) == expected, [f.line() for f in found]
    assert found[4].outcome == NOT_TESTABLE  # these cards have no variables: see test_abstraction.py
    for f in found:
        assert f.detail and f.figure
        assert verdict.Finding.from_dict(f.to_dict()) == f
    text = verdict.text(run, found)
    assert text.splitlines()[0].startswith("Necessity: ")
    assert "What this does not show" in text
    assert ("Caveat: this model's readout cannot see the question" in text) == (
        not run["readout_sees_question"]
    )


def test_equal_to_the_control_is_not_evidence():
    """The case the verdict exists for: identical figures are no evidence that grounding put the
    reasoning in the blocks, however good they look on their own."""
    necessity, sufficiency, decodability, *_ = verdict.findings(card(), control(**SAME))
    assert all(f.outcome == NOT_SUPPORTED for f in (necessity, sufficiency, decodability))
    assert "not evidence" in necessity.detail
    for f in (sufficiency, decodability):
        assert "not below it beyond both intervals" in f.detail


def test_findings_carry_both_runs_figures_and_references():
    necessity, sufficiency, decodability, location, _ = verdict.findings(card(), control())
    assert set(necessity.run) == {"intact", "ablated", "drop"} and set(necessity.control) == set(
        necessity.run
    )
    assert necessity.run["drop"] == Estimate.from_dict(est(0.80))
    assert sufficiency.reference == {"chance": 0.1}
    assert decodability.reference == {"zero": 0.0}
    assert location.reference == {"bar": MIN_RECOVERY}
    assert (
        "layer 1, block 1" in location.detail
        and "step 1's value from block 1 at layer 2" in decodability.detail
    )


def test_undefined_figures_are_missing_not_zero():
    """A figure saved as null (NaN) is not testable rather than compared as a number."""
    nan = {"value": None, "lo": None, "hi": None, "n": 0, "method": "bootstrap"}
    location = verdict.location(card(patching_peak_recovery=nan), control())
    assert location.outcome == NOT_TESTABLE


def test_no_transfer_at_all_is_not_above_a_zero_chance():
    """0 of n pairs has a lower bound of exactly 0, so it is never read as above a chance of 0."""
    none = wilson(0, 100)
    assert (none.lo, wilson(100, 100).hi) == (0.0, 1.0)
    finding = verdict.sufficiency(
        card(chance_accuracy=None, interchange_transfer_rate=none.to_dict()), control()
    )
    assert finding.outcome == NOT_SUPPORTED and "not above chance (0.000)" in finding.detail
