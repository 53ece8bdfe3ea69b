"""The verdict: do the memory blocks carry the reasoning? Five findings, each decided by intervals.

Each finding compares 95% interval bounds, never points (`stats.Estimate.above / below`): the RiM
run against its equal control (the `pause` run: the same model, blocks and visibility, minus the
grounding), ablated against intact, transfer against chance. Every figure of both runs is
measured the same way on the same examples (see `report.CARD`). Outcomes:

- **necessity**: accuracy with every block mean-ablated (all layers and slots) against intact.
  Supported if ablated.hi < intact.lo AND the drop (intact - ablated, paired bootstrap over
  examples) of the run exceeds the control's drop beyond both intervals.
- **sufficiency**: interchange, B given all of A's block states: the rate at which B's output
  becomes A's answer (Wilson over pairs). Supported if its lower bound exceeds chance AND the
  control's upper bound.
- **decodability**: the most selective value probe, chosen on one half of the examples (by
  question) and scored on the other, selectivity = probe score - control-task score with a
  bootstrap interval over questions. Supported if its lower bound exceeds 0 AND the control
  model's upper bound (the same procedure on the control run).
- **location**: activation patching's peak (layer, block), chosen on one half of the pairs, its
  recovery of the clean logit difference on the other half (bootstrap over pairs). Supported if
  its lower bound exceeds MIN_RECOVERY: one (layer, block) carries most of what tells the clean
  answer from the corrupt one. The control's peak is shown beside it.

- **variables**: causal abstraction (`abstraction`): for each variable a step of the task's
  causal model computes, a DAS subspace at the site (layer, block, slot) best on training pairs,
  its interchange-intervention accuracy (IIA: how often the output becomes the causal model's
  answer with that variable taken from the other question) on held-out pairs (Wilson). A variable
  is supported if its IIA's lower bound exceeds MIN_IIA AND the upper bound of every control at
  the same site: the norm-matched random placebo, DAS on arbitrary targets, DAS on an untrained
  copy, and DAS on the control (pause) model. The finding is supported when every step variable
  is; whether step t sits in block t (RiM's grounding claim) is stated beside each.

"Not testable here" when the test cannot tell: the model is not above chance, there is no
control to compare with, the analysis could not run (e.g. a task that cannot corrupt its
questions), or, for necessity and sufficiency, the readout cannot see the question
(`readout_sees_question: false`): then every answer must pass through the blocks and both hold
by construction, which is no evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rim_lens.data.causal import STEP
from rim_lens.stats import Estimate

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE = "supported", "not supported", "not testable here"
OUTCOMES = (SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE)
FINDINGS = ("necessity", "sufficiency", "decodability", "location", "variables")

# -- every threshold of the verdict ---------------------------------------------------------------
MIN_RECOVERY = 0.5  # location: the peak's recovery must exceed this beyond its interval
MIN_LOGIT_GAP = 0.5  # location: clean and corrupt runs must differ this much (nats) to be told apart
SELECT_FRACTION = 0.5  # decodability, location, variables: the share the best cell is chosen on
MIN_IIA = 0.5  # variables: the best site's IIA must exceed this beyond its interval


@dataclass
class Finding:
    """One finding: its outcome, the run's and the control's figures and why."""

    name: str
    outcome: str
    figure: str  # what is measured, in words
    run: dict[str, Estimate] = field(default_factory=dict)
    control: dict[str, Estimate] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)  # e.g. chance, the recovery bar
    detail: str = ""

    def to_dict(self) -> dict:
        def ests(d):
            return {k: v.to_dict() for k, v in d.items()}

        return {**self.__dict__, "run": ests(self.run), "control": ests(self.control)}

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        def ests(x):
            return {k: Estimate.from_dict(v) for k, v in (x or {}).items()}

        return cls(**{**d, "run": ests(d.get("run")), "control": ests(d.get("control"))})

    def line(self) -> str:
        return f"{self.name.capitalize()}: {self.outcome}. {self.detail}"


def estimate(card: dict | None, key: str) -> Estimate | None:
    """A card's figure as an Estimate (None if missing or undefined, e.g. NaN saved as null)."""
    value = (card or {}).get(key)
    if not isinstance(value, dict) or any(value.get(k) is None for k in ("value", "lo", "hi")):
        return None
    return Estimate.from_dict(value)


def _chance(card: dict) -> float:
    return card.get("chance_accuracy") or 0.0


def _untestable(run: dict, control: dict | None, needs_question: bool) -> str:
    """Why a causal finding cannot be tested on these runs ("" if it can)."""
    intact = estimate(run, "accuracy_intact")
    if intact is None or not intact.above(_chance(run)):
        shown = f" ({intact})" if intact else ""
        return f"the model is not above chance{shown}, so there is nothing for the blocks to carry"
    if needs_question and run.get("readout_sees_question") is False:
        return (
            "this model's readout cannot see the question (readout_sees_question: false), so every "
            "answer must pass through the blocks and this holds by construction"
        )
    if control is None:
        return "there is no control run (an equal pause model) to compare with"
    return ""


def necessity(run: dict, control: dict | None) -> Finding:
    intact, ablated, drop = (
        estimate(run, k) for k in ("accuracy_intact", "accuracy_all_blocks_ablated", "ablation_drop")
    )
    c_intact, c_ablated, c_drop = (
        estimate(control, k) for k in ("accuracy_intact", "accuracy_all_blocks_ablated", "ablation_drop")
    )
    f = Finding(
        "necessity",
        NOT_TESTABLE,
        "accuracy with every block mean-ablated, against intact (same examples, teacher-forced)",
        {k: v for k, v in (("intact", intact), ("ablated", ablated), ("drop", drop)) if v},
        {k: v for k, v in (("intact", c_intact), ("ablated", c_ablated), ("drop", c_drop)) if v},
        {"chance": _chance(run)},
    )
    if intact is None or ablated is None:
        f.detail = "the ablation was not run."
        return f
    needed = ablated.below(intact)
    measured = f"Mean-ablating every memory block takes accuracy from {intact} to {ablated}" + (
        ", so the answers depend on the block states" if needed else ", within the intervals of intact"
    )
    why = _untestable(run, control, needs_question=True)
    if why:
        f.detail = f"{measured}; but {why}."
        return f
    beyond = drop is not None and c_drop is not None and drop.above(c_drop)
    f.outcome = SUPPORTED if needed and beyond else NOT_SUPPORTED
    f.detail = f"{measured}; the drop {drop} " + (
        f"exceeds the control's {c_drop} beyond both intervals."
        if beyond
        else f"does not exceed the control's {c_drop} beyond both intervals, so blocks trained without "
        "grounding are needed as much: not evidence that the grounding put the reasoning there."
    )
    return f


def sufficiency(run: dict, control: dict | None) -> Finding:
    transfer, c_transfer = (
        estimate(run, "interchange_transfer_rate"),
        estimate(control, "interchange_transfer_rate"),
    )
    chance = _chance(run)
    f = Finding(
        "sufficiency",
        NOT_TESTABLE,
        "interchange: how often B's output becomes A's answer when B gets all of A's block states",
        {"transfer": transfer} if transfer else {},
        {"transfer": c_transfer} if c_transfer else {},
        {"chance": chance},
    )
    if transfer is None:
        f.detail = "interchange was not run."
        return f
    above_chance = transfer.above(chance)
    measured = (
        f"Given another example's block states, the output becomes that example's answer in {transfer} of "
        "pairs" + (f", above chance ({chance:.3f})" if above_chance else f", not above chance ({chance:.3f})")
    )
    why = _untestable(run, control, needs_question=True)
    if why:
        f.detail = f"{measured}; but {why}."
        return f
    beyond = c_transfer is not None and transfer.above(c_transfer)
    f.outcome = SUPPORTED if above_chance and beyond else NOT_SUPPORTED
    f.detail = f"{measured}; the control's rate is {c_transfer}" + (
        ", below it beyond both intervals." if beyond else ", not below it beyond both intervals."
    )
    return f


def decodability(run: dict, control: dict | None) -> Finding:
    sel, c_sel = (
        estimate(run, "best_value_probe_selectivity"),
        estimate(control, "best_value_probe_selectivity"),
    )
    best = run.get("best_value_probe") or {}
    f = Finding(
        "decodability",
        NOT_TESTABLE,
        "selectivity (probe score - control-task score) of the best value probe, chosen on half of "
        "the examples and scored on the other half",
        {"selectivity": sel} if sel else {},
        {"selectivity": c_sel} if c_sel else {},
        {"zero": 0.0},
    )
    if sel is None:
        f.detail = "no value probe could be fitted (see the probe table's notes)."
        return f
    where = f"step {best.get('step')}'s value from block {best.get('block')} at layer {best.get('layer')}"
    measured = f"The best linear probe reads {where} with selectivity {sel}" + (
        ", above 0" if sel.above(0.0) else ", not above 0"
    )
    if control is None or c_sel is None:
        f.detail = f"{measured}; but there is no control run to compare with."
        return f
    beyond = sel.above(c_sel)
    f.outcome = SUPPORTED if sel.above(0.0) and beyond else NOT_SUPPORTED
    f.detail = f"{measured}; the control model's best is {c_sel}" + (
        ", below it beyond both intervals." if beyond else ", not below it beyond both intervals."
    )
    return f


def location(run: dict, control: dict | None) -> Finding:
    recovery, c_recovery = (
        estimate(run, "patching_peak_recovery"),
        estimate(control, "patching_peak_recovery"),
    )
    peak = run.get("patching_peak") or {}
    f = Finding(
        "location",
        NOT_TESTABLE,
        "activation patching: recovery of the clean logit difference at the peak (layer, block), "
        "chosen on half of the pairs and scored on the other half",
        {"recovery": recovery} if recovery else {},
        {"recovery": c_recovery} if c_recovery else {},
        {"bar": MIN_RECOVERY},
    )
    if recovery is None:
        f.detail = (
            f"activation patching was not run ({run.get('patching_note') or 'no clean/corrupt pairs'})."
        )
        return f
    gap = run.get("patching_logit_gap")
    if gap is not None and gap < MIN_LOGIT_GAP:
        f.detail = (
            f"the clean and corrupt runs differ by {gap:.2f} in logit difference (< {MIN_LOGIT_GAP}): "
            "the model does not tell them apart, so there is nothing to recover."
        )
        return f
    strong = recovery.above(MIN_RECOVERY)
    f.outcome = SUPPORTED if strong else NOT_SUPPORTED
    f.detail = (
        f"Patching clean states into layer {peak.get('layer')}, block {peak.get('block')} of a corrupted "
        f"run recovers {recovery} of the clean logit difference"
        + (
            f", more than {MIN_RECOVERY} beyond its interval"
            if strong
            else f", not more than {MIN_RECOVERY} beyond its interval"
        )
        + (f"; the control's peak recovers {c_recovery}." if c_recovery else ".")
    )
    return f


# The controls of the variables finding: the run card's entries at the best site, and the control card's.
VARIABLE_CONTROLS = ("placebo", "arbitrary", "untrained")


def variables(run: dict, control: dict | None) -> Finding:
    steps = {n: e for n, e in (run.get("variables") or {}).items() if e.get("kind") == STEP}
    c_steps = (control or {}).get("variables") or {}
    measured = {n: estimate(e, "iia") for n, e in steps.items()}
    against = {
        n: {
            **{which: estimate(e, which) for which in VARIABLE_CONTROLS},
            "pause": estimate(c_steps.get(n), "iia"),
        }
        for n, e in steps.items()
    }
    f = Finding(
        "variables",
        NOT_TESTABLE,
        "causal abstraction: IIA of a DAS subspace at each step variable's best site (chosen on training "
        "pairs) on held-out pairs, against the same site's placebo, arbitrary-target and untrained DAS, "
        "and the control model's DAS",
        {n: e for n, e in measured.items() if e},
        {f"{n} {which}": e for n, c in against.items() for which, e in c.items() if e},
        {"bar": MIN_IIA},
    )
    if not any(measured.values()):
        note = run.get("variables_note") or "no step variable had informative pairs"
        f.detail = f"causal abstraction was not run or found nothing to test ({note})."
        return f
    lines, outcomes = [], []
    for name, iia in measured.items():
        entry, controls = steps[name], against[name]
        if iia is None:
            lines.append(f"{name}: not testable ({entry.get('note') or 'no informative pairs'})")
            continue
        site = entry.get("site") or {}
        step, block = entry.get("step"), site.get("block")
        where = f"layer {site.get('layer')}, block {block}, slot {site.get('slot')}"
        grounded = "in block t = step t" if block == step else f"not in block {step}"
        shown = ", ".join(f"{k} {v}" for k, v in controls.items() if v)
        line = f"{name} ({entry.get('label', name)}) is best at {where} ({grounded}): IIA {iia}; {shown}"
        missing = [k for k, v in controls.items() if v is None]
        if missing:
            lines.append(f"{line}: not testable (no {', '.join(missing)} figure)")
            continue
        beaten = [k for k, v in controls.items() if not iia.above(v)]
        held = iia.above(MIN_IIA) and not beaten
        outcomes.append(held)
        why = (
            "supported"
            if held
            else f"not above {MIN_IIA} beyond its interval"
            if not iia.above(MIN_IIA)
            else f"not above {', '.join(beaten)} beyond both intervals"
        )
        lines.append(f"{line}: {why}")
    why = _untestable(run, control, needs_question=False)
    if why or not outcomes:
        f.detail = "; ".join(lines) + (f"; but {why}." if why else ".")
        return f
    f.outcome = SUPPORTED if all(outcomes) and len(outcomes) == len(measured) else NOT_SUPPORTED
    f.detail = "; ".join(lines) + "."
    return f


def findings(run: dict, control: dict | None) -> list[Finding]:
    """The five findings of a RiM run's card against its control's card (None: no control)."""
    return [
        necessity(run, control),
        sufficiency(run, control),
        decodability(run, control),
        location(run, control),
        variables(run, control),
    ]


def text(run: dict, found: list[Finding]) -> str:
    """The verdict in plain language: one line per finding, then what the numbers do not show."""
    lines = [f.line() for f in found]
    if run.get("readout_sees_question") is False:
        lines.append(
            "Caveat: this model's readout cannot see the question (readout_sees_question: false), so every "
            "answer "
            "must pass through the blocks by construction; necessity and transfer are expected here, and the "
            "informative findings are where the information sits (location) and what the blocks encode "
            "(decodability)."
        )
    lines.append(
        "What this does not show: probes are correlational; ablation, patching and interchange show that "
        "block "
        "states carry information the answer uses; causal abstraction tests one variable at one site at a "
        "time, not that the whole computation inside the blocks follows the chain-of-thought steps; these "
        f"numbers come from {run.get('n')} held-out examples of one task and "
        "model."
    )
    return "\n".join(lines)
