"""The verdict, table-driven on hand-built cards: each finding compares interval bounds, never
points, a RiM run that merely equals its control is never called evidence, and a test that did
not fire says what it detects (its calibration)."""

from __future__ import annotations

import pytest

from rim_lens.analysis import verdict
from rim_lens.analysis.verdict import MIN_RECOVERY, NOT_DETECTED, NOT_TESTABLE, PARTIAL, SUPPORTED
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
        "interchange_changed_rate": est(0.90),
        "interchange_logprob_gain": est(3.0),
        "decodability_gain": est(0.40),
        "decodability_cell": {"layer": 2, "block": 1, "step": 1},
        "decodability_scores": {"question": 0.3, "question_and_block": 0.7},
        "blocks_carry_recovery": est(0.80),
        "blocks_carry_layer": 1,
        "patching_peak_recovery": est(0.60),
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
        interchange_changed_rate=est(0.10),
        decodability_gain=est(0.05),
        blocks_carry_recovery=est(0.20),
    )
    return {**base, **figures}


SAME = dict(  # a control that matches the run figure for figure
    accuracy_intact=est(0.90),
    accuracy_all_blocks_ablated=est(0.10),
    ablation_drop=est(0.80),
    interchange_transfer_rate=est(0.70),
    interchange_changed_rate=est(0.90),
    decodability_gain=est(0.40),
    blocks_carry_recovery=est(0.80),
)

CASES = [
    # (case, run card, control card, expected outcomes: necessity, sufficiency, decodability, location)
    ("clear evidence", card(), control(), (SUPPORTED, SUPPORTED, SUPPORTED, SUPPORTED)),
    (
        "RiM equals the control",
        card(),
        control(**SAME),
        (NOT_DETECTED, NOT_DETECTED, NOT_DETECTED, NOT_DETECTED),
    ),
    (
        "points differ but intervals overlap",
        card(
            ablation_drop=est(0.30, 0.15),
            interchange_transfer_rate=est(0.25, 0.1),
            interchange_changed_rate=est(0.30, 0.1),
        ),
        control(
            ablation_drop=est(0.15, 0.1),
            interchange_transfer_rate=est(0.15, 0.08),
            interchange_changed_rate=est(0.2, 0.08),
        ),
        (NOT_DETECTED, NOT_DETECTED, SUPPORTED, SUPPORTED),
    ),
    (
        "ablation does not hurt",
        card(accuracy_all_blocks_ablated=est(0.88), ablation_drop=est(0.02, 0.03)),
        control(),
        (NOT_DETECTED, SUPPORTED, SUPPORTED, SUPPORTED),
    ),
    (
        "transfer at chance, nothing moves",
        card(interchange_transfer_rate=est(0.12, 0.04), interchange_changed_rate=est(0.10)),
        control(interchange_transfer_rate=est(0.0, 0.0)),
        (SUPPORTED, NOT_DETECTED, SUPPORTED, SUPPORTED),
    ),
    (
        "transfer at chance, but the answer moves towards the donor's: partial",
        card(interchange_transfer_rate=est(0.12, 0.04)),
        control(interchange_transfer_rate=est(0.0, 0.0)),
        (SUPPORTED, PARTIAL, SUPPORTED, SUPPORTED),
    ),
    (
        "the answer moves, but not towards the donor's",
        card(interchange_transfer_rate=est(0.12, 0.04), interchange_logprob_gain=est(0.05, 0.2)),
        control(interchange_transfer_rate=est(0.0, 0.0)),
        (SUPPORTED, NOT_DETECTED, SUPPORTED, SUPPORTED),
    ),
    ("no control run", card(), None, (NOT_TESTABLE, NOT_TESTABLE, NOT_TESTABLE, SUPPORTED)),
    (
        "a control with no cell to probe gains 0",
        card(),
        control(decodability_gain=Estimate(0.0, 0.0, 0.0, 0, "none probed").to_dict()),
        (SUPPORTED, SUPPORTED, SUPPORTED, SUPPORTED),
    ),
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
        "block adds to the question, but not beyond zero",
        card(decodability_gain=est(0.04, 0.06)),
        control(decodability_gain=est(-0.2, 0.05)),
        (SUPPORTED, SUPPORTED, NOT_DETECTED, SUPPORTED),
    ),
    (
        "recovery interval reaches below the bar",
        card(blocks_carry_recovery=est(0.6, 0.2)),
        control(),
        (SUPPORTED, SUPPORTED, SUPPORTED, NOT_DETECTED),
    ),
    (
        "the blocks carry it no more than the control's",
        card(),
        control(blocks_carry_recovery=est(0.75)),
        (SUPPORTED, SUPPORTED, SUPPORTED, NOT_DETECTED),
    ),
    (
        "nothing to patch or probe",
        card(blocks_carry_recovery=None, patching_peak_recovery=None, decodability_gain=None),
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
    assert all(f.outcome == NOT_DETECTED for f in (necessity, sufficiency, decodability))
    assert "not evidence" in necessity.detail
    assert "not below beyond both intervals" in sufficiency.detail
    assert "not below it beyond both intervals" in decodability.detail


def calibration(detection: float, false_positive: float = 0.0) -> dict:
    return {"detection": detection, "false_positive": false_positive, "seeds": 5, "n": 200, "parts": {}}


def test_a_test_that_did_not_fire_says_what_it_detects():
    """Never "not supported": a calibrated test that finds planted carriers says so beside its "not
    detected"; one that misses them says "this test misses a planted carrier at this n"; an
    uncalibrated one says its power is not known."""
    run, ctrl = card(), control(**SAME)
    good = {name: calibration(1.0) for name in verdict.FINDINGS}
    blind = {name: calibration(0.4) for name in verdict.FINDINGS}
    for calibrated, expected in (
        (good, "not detected by a test that detects a planted carrier in 1.00"),
        (
            blind,
            "not detected (this test misses a planted carrier at this n: detects a planted carrier in 0.40",
        ),
        (None, "not detected (power not calibrated: run `rim-lens analyze calibrate RUN`)"),
    ):
        necessity = verdict.findings(run, ctrl, calibrated)[0]
        assert necessity.outcome == NOT_DETECTED and necessity.shown.startswith(expected), necessity.shown
        assert "not supported" not in necessity.line()
    noisy = verdict.findings(card(), control(), {"necessity": calibration(1.0, 0.4)})[0]
    assert noisy.outcome == SUPPORTED and "also fires on planted non-carriers" in noisy.shown


def test_location_states_whether_step_t_sits_in_block_t():
    def blocks(own: float, other: float) -> dict:
        return {"1": est(own, 0.03), "2": est(other, 0.03), "3": est(0.0, 0.01)}

    grounded = {"1": {"pairs": 40, "blocks": blocks(0.9, 0.1)}, "2": {"pairs": 40, "blocks": {
        "1": est(0.05, 0.03), "2": est(0.85, 0.03), "3": est(0.0, 0.01)}}}  # fmt: skip
    found = verdict.location(card(grounding=grounded), control())
    assert found.outcome == SUPPORTED and found.parts == {verdict.GROUNDING: SUPPORTED}, found.detail
    swapped = {**grounded, "1": {"pairs": 40, "blocks": blocks(0.1, 0.9)}}
    assert verdict.location(card(grounding=swapped), control()).parts == {verdict.GROUNDING: NOT_DETECTED}
    few = {"1": {"pairs": 3, "blocks": blocks(0.9, 0.1)}}
    assert verdict.location(card(grounding=few), control()).parts == {verdict.GROUNDING: NOT_TESTABLE}


def test_findings_carry_both_runs_figures_and_references():
    necessity, sufficiency, decodability, location, _ = verdict.findings(card(), control())
    assert set(necessity.run) == {"intact", "ablated", "drop"} and set(necessity.control) == set(
        necessity.run
    )
    assert necessity.run["drop"] == Estimate.from_dict(est(0.80))
    assert sufficiency.reference == {"chance": 0.1}
    assert decodability.reference == {"zero": 0.0}
    assert location.reference == {"bar": MIN_RECOVERY}
    assert "every block at layer 1" in location.detail and "layer 1, block 1" in location.detail
    assert "step 1's value from block 1 at layer 2" in decodability.detail


def test_undefined_figures_are_missing_not_zero():
    """A figure saved as null (NaN) is not testable rather than compared as a number."""
    nan = {"value": None, "lo": None, "hi": None, "n": 0, "method": "bootstrap"}
    location = verdict.location(card(blocks_carry_recovery=nan), control())
    assert location.outcome == NOT_TESTABLE


def test_no_transfer_at_all_is_not_above_a_zero_chance():
    """0 of n pairs has a lower bound of exactly 0, so it is never read as above a chance of 0."""
    none = wilson(0, 100)
    assert (none.lo, wilson(100, 100).hi) == (0.0, 1.0)
    finding = verdict.sufficiency(
        card(
            chance_accuracy=None, interchange_transfer_rate=none.to_dict(), interchange_changed_rate=est(0.1)
        ),
        control(),
    )
    assert finding.outcome == NOT_DETECTED and "not above chance (0.000)" in finding.detail
