"""The verdict: do the memory blocks carry the reasoning? Five findings, each decided by intervals,
each stated with what its test detects at this n.

Each finding compares 95% interval bounds, never points (`stats.Estimate.above / below`): the RiM
run against its equal control (the `pause` run: the same model, blocks and visibility, minus the
grounding), ablated against intact, transfer against chance. Every figure of both runs is
measured the same way on the same examples (see `card.CARD`). Outcomes:

- **necessity**: accuracy with every block mean-ablated (all layers and slots) against intact.
  Supported if ablated.hi < intact.lo AND the drop (intact - ablated, paired bootstrap over
  examples) of the run exceeds the control's drop beyond both intervals.
- **sufficiency**: interchange, B given all of A's block states. Supported if the rate at which
  B's output becomes A's answer (Wilson over pairs) exceeds chance AND the control's upper bound.
  Partial if not, but B's output changes (1 - unchanged) more often than the control's beyond
  both intervals AND A's answer's log-prob rises (paired bootstrap, lower bound above 0): the
  blocks carry part of what decides the answer. Beside it, the share of answer tokens that take
  the donor's value, and the matched/unmatched-value interchange per step and block.
- **decodability**: conditional probing (`conditional`): the (layer, block, step) where a probe on
  [question states; block states] beats the probe on the question states alone by most on
  validation, that gain on the report's examples (bootstrap over question groups). Supported if
  its lower bound exceeds 0 AND the control model's upper bound (a control with no cell to probe
  gains 0). The control-task selectivity of the logistic value probes is shown, not decided on.
- **location**: activation patching over sets of blocks. Supported if patching every block at the
  best layer (chosen on half of the pairs) recovers more than MIN_RECOVERY of the clean logit
  difference on the other half, beyond its interval, and more than the control beyond both. Its
  part "step t sits in block t": on the pairs that change only step t's value, block t (patched
  at every layer) recovers more than every other block beyond the intervals, for every step with
  MIN_STEP_PAIRS such pairs. The single (layer, block) peak is shown beside it.
- **variables**: causal abstraction (`abstraction`): for each step variable of the task's causal
  model, DAS at the unit (a site, or every slot of several blocks at one layer) and rank best on
  training pairs, its interchange-intervention accuracy (IIA) on held-out pairs (Wilson).
  Supported if every step variable's IIA exceeds MIN_IIA AND the upper bound of every control at
  the same unit: the norm-matched placebo, DAS on arbitrary targets, DAS on an untrained copy,
  and DAS on the control model. The full state's IIA at the same sites is shown beside it ("DAS
  under-fit" where DAS is more than `abstraction.UNDERFIT` below it on training pairs).

"Not detected" is what a test that did not fire says: with a calibration (`calibration`), each
finding states its test's detection rate on planted carriers at this n, and a test that misses
planted carriers (detection below MIN_DETECTION) says so. "Not testable here" when the test
cannot tell: the model is not above chance, there is no control to compare with, the analysis
could not run (e.g. a task that cannot corrupt its questions), the model is right too rarely for
the finding's bar to be reachable (variables: intact accuracy's upper bound below MIN_IIA), or,
for necessity and sufficiency, the readout cannot see the question (`readout_sees_question:
false`): then every answer must pass through the blocks and both hold by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rim_lens.data.causal import STEP
from rim_lens.stats import Estimate

SUPPORTED, PARTIAL, NOT_DETECTED, NOT_TESTABLE = "supported", "partial", "not detected", "not testable here"
OUTCOMES = (SUPPORTED, PARTIAL, NOT_DETECTED, NOT_TESTABLE)
FINDINGS = ("necessity", "sufficiency", "decodability", "location", "variables")
GROUNDING = "step t sits in block t"  # the part of the location finding that is RiM's grounding claim

# -- every threshold of the verdict ---------------------------------------------------------------
MIN_RECOVERY = 0.5  # location: the blocks' recovery must exceed this beyond its interval
MIN_LOGIT_GAP = 0.5  # location: clean and corrupt runs must differ this much (nats) to be told apart
MIN_STEP_PAIRS = 10  # location's grounding part: pairs changing only step t needed to judge step t
SELECT_FRACTION = 0.5  # decodability, location, variables: the share the best cell is chosen on
MIN_IIA = 0.5  # variables: the best unit's IIA must exceed this beyond its interval
MIN_DETECTION = 0.9  # calibration: a test detects planted carriers at least this often ...
MAX_FALSE_POSITIVE = 0.1  # ... and fires on planted non-carriers at most this often ...
CALIBRATION_SEEDS = 5  # ... over this many planted seeds (`calibration`)


@dataclass
class Finding:
    """One finding: its outcome, the run's and the control's figures and why; `parts` the outcomes
    of its sub-claims; `calibration` what its test scores on planted models at this n."""

    name: str
    outcome: str
    figure: str  # what is measured, in words
    run: dict[str, Estimate] = field(default_factory=dict)
    control: dict[str, Estimate] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)  # e.g. chance, the recovery bar
    detail: str = ""
    parts: dict[str, str] = field(default_factory=dict)
    calibration: dict | None = None

    def to_dict(self) -> dict:
        def ests(d):
            return {k: v.to_dict() for k, v in d.items()}

        return {**self.__dict__, "run": ests(self.run), "control": ests(self.control)}

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        def ests(x):
            return {k: Estimate.from_dict(v) for k, v in (x or {}).items()}

        return cls(**{**d, "run": ests(d.get("run")), "control": ests(d.get("control"))})

    @property
    def shown(self) -> str:
        """The outcome as written: a test that did not fire says what it detects (`power`)."""
        return shown(self.outcome, self.calibration)

    def line(self) -> str:
        parts = "".join(
            f" Part '{name}': {shown(o, _part(self.calibration, name))}." for name, o in self.parts.items()
        )
        return f"{self.name.capitalize()}: {self.shown}. {self.detail}{parts}"


def _part(calibration: dict | None, name: str) -> dict | None:
    return ((calibration or {}).get("parts") or {}).get(name)


def power(calibration: dict | None) -> str:
    """What a test detects at this n, in words (from a finding's calibration)."""
    if not calibration or calibration.get("detection") is None:
        return "power not calibrated: run `rim-lens analyze calibrate RUN`"
    c = calibration
    return (
        f"detects a planted carrier in {c['detection']:.2f}, fires on a planted non-carrier in "
        f"{c['false_positive']:.2f} of {c['seeds']} seeds at n = {c['n']}"
    )


def shown(outcome: str, calibration: dict | None) -> str:
    """An outcome with what its test is worth: "not detected" by a calibrated test that finds planted
    carriers says so; by one that misses them, "this test misses a planted carrier at this n"."""
    c = calibration or {}
    if outcome == NOT_DETECTED:
        if c.get("detection") is None:
            return f"{NOT_DETECTED} ({power(c)})"
        if c["detection"] < MIN_DETECTION:
            return f"{NOT_DETECTED} (this test misses a planted carrier at this n: {power(c)})"
        return f"{NOT_DETECTED} by a test that {power(c)}"
    if outcome in (SUPPORTED, PARTIAL) and c.get("false_positive") is not None:
        if c["false_positive"] > MAX_FALSE_POSITIVE:
            return f"{outcome} (but this test also fires on planted non-carriers: {power(c)})"
        return f"{outcome} (the test {power(c)})"
    return outcome


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


def _unreachable(run: dict, bar: float) -> str:
    """Why a bar on a rate of right answers cannot be reached ("" if it can): the model is right on
    too few of the analysed examples."""
    intact = estimate(run, "accuracy_intact")
    if intact is not None and intact.hi < bar:
        right = f" ({run['n_correct']} of {run.get('n')})" if run.get("n_correct") is not None else ""
        return (
            f"the model answers {intact} of these examples correctly{right}: a rate of right "
            f"counterfactual answers above {bar} cannot be expected of it, so this is not decided"
        )
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
    f.outcome = SUPPORTED if needed and beyond else NOT_DETECTED
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
    changed, c_changed = (
        estimate(run, "interchange_changed_rate"),
        estimate(control, "interchange_changed_rate"),
    )
    gain, tokens = estimate(run, "interchange_logprob_gain"), estimate(run, "interchange_donor_tokens")
    chance = _chance(run)
    figures = {"transfer": transfer, "changed": changed, "log-prob gain": gain}
    f = Finding(
        "sufficiency",
        NOT_TESTABLE,
        "interchange: how often B's output becomes A's answer when B gets all of A's block states; "
        "graded: how often it changes, and how far A's answer's log-prob rises",
        {k: v for k, v in figures.items() if v},
        {k: v for k, v in (("transfer", c_transfer), ("changed", c_changed)) if v},
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
    if changed is not None and gain is not None:
        measured += f"; it changes in {changed}, A's answer gains {gain} nats of log-prob"
        measured += f", and {tokens} of the answer tokens that differ take A's value" if tokens else ""
    measured += _values_text(run, control)
    why = _untestable(run, control, needs_question=True)
    if why:
        f.detail = f"{measured}; but {why}."
        return f
    beyond = c_transfer is not None and transfer.above(c_transfer)
    if above_chance and beyond:
        f.outcome = SUPPORTED
        f.detail = f"{measured}; the control's transfer is {c_transfer}, below it beyond both intervals."
        return f
    moves = changed is not None and c_changed is not None and changed.above(c_changed)
    rises = gain is not None and gain.above(0.0)
    f.outcome = PARTIAL if moves and rises else NOT_DETECTED
    f.detail = (
        f"{measured}; the control's transfer is {c_transfer} (not below beyond both intervals) and its "
        f"output changes in {c_changed}"
        + (
            ": the blocks carry part of what decides the answer (it changes more than the control's, "
            "towards A's answer), not all of it."
            if f.outcome == PARTIAL
            else "."
        )
    )
    return f


def _values_text(run: dict, control: dict | None) -> str:
    """The matched/unmatched-value interchange at each step's own block, against the control's."""
    found, theirs = run.get("value_interchange") or {}, (control or {}).get("value_interchange") or {}
    out = []
    for step, e in sorted(found.items(), key=lambda x: int(x[0])):
        moves, stays = estimate(e, "unmatched_moves"), estimate(e, "matched_stays")
        other = estimate(theirs.get(step), "unmatched_moves")
        if moves is None and stays is None:
            continue
        where = f"block {e.get('block')}"
        text = f"step {step} at {where}: a donor with another value moves the answer to the causal model's "
        text += f"counterfactual in {moves}" if moves else "counterfactual in –"
        text += f" (control {other})" if other else ""
        text += f", one with the same value leaves it in {stays}" if stays else ""
        out.append(text)
    return ("; matched/unmatched-value interchange: " + "; ".join(out)) if out else ""


def decodability(run: dict, control: dict | None) -> Finding:
    gain, c_gain = estimate(run, "decodability_gain"), estimate(control, "decodability_gain")
    cell = run.get("decodability_cell") or {}
    f = Finding(
        "decodability",
        NOT_TESTABLE,
        "conditional probing: what a block adds to the question's own states about a step's value (probe on "
        "[question; block] minus probe on the question, digit accuracy), cell chosen on validation, scored "
        "on the report's examples",
        {"gain": gain} if gain else {},
        {"gain": c_gain} if c_gain else {},
        {"zero": 0.0},
    )
    if gain is None:
        note = run.get("decodability_note") or "no conditional probe could be fitted"
        f.detail = f"{note}."
        return f
    scores = run.get("decodability_scores") or {}
    where = f"step {cell.get('step')}'s value from block {cell.get('block')} at layer {cell.get('layer')}"
    measured = (
        f"The block that adds most to the question's states reads {where}: digit accuracy "
        f"{scores.get('question_and_block', float('nan')):.3f} with the block against "
        f"{scores.get('question', float('nan')):.3f} from the question alone, a gain of {gain}"
        + (", above 0" if gain.above(0.0) else ", not above 0")
    )
    curve = run.get("decodability_curve") or {}
    if curve:
        measured += " (learning curve: " + ", ".join(f"{n} states {v:+.3f}" for n, v in curve.items()) + ")"
    selectivity = estimate(run, "best_value_probe_selectivity")
    if selectivity:
        measured += (
            f"; the control-task selectivity of the best value probe is {selectivity} (not decided on)"
        )
    if control is None or c_gain is None:
        f.detail = f"{measured}; but there is no control run to compare with."
        return f
    beyond = gain.above(c_gain)
    f.outcome = SUPPORTED if gain.above(0.0) and beyond else NOT_DETECTED
    f.detail = f"{measured}; the control model's best gain is {c_gain}" + (
        ", below it beyond both intervals." if beyond else ", not below it beyond both intervals."
    )
    return f


def location(run: dict, control: dict | None) -> Finding:
    carried, c_carried = estimate(run, "blocks_carry_recovery"), estimate(control, "blocks_carry_recovery")
    peak, recovery = run.get("patching_peak") or {}, estimate(run, "patching_peak_recovery")
    f = Finding(
        "location",
        NOT_TESTABLE,
        "activation patching: recovery of the clean logit difference when every block is patched at the "
        "best layer (chosen on half of the pairs, scored on the other half); and, on pairs that change one "
        "step only, each block's recovery patched at every layer",
        {k: v for k, v in (("every block", carried), ("peak cell", recovery)) if v},
        {"every block": c_carried} if c_carried else {},
        {"bar": MIN_RECOVERY},
    )
    if carried is None:
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
    strong = carried.above(MIN_RECOVERY)
    beyond = c_carried is None or carried.above(c_carried)
    layer = run.get("blocks_carry_layer")
    f.detail = (
        f"Patching clean states into every block at layer {layer} of a corrupted run recovers {carried} of "
        "the clean logit difference"
        + (f", more than {MIN_RECOVERY}" if strong else f", not more than {MIN_RECOVERY}")
        + " beyond its interval"
        + (
            f"; the control's recovers {c_carried}"
            if c_carried
            else "; there is no control run to compare with"
        )
        + (
            f"; the best single cell, layer {peak.get('layer')}, block {peak.get('block')}, "
            f"recovers {recovery}"
            if recovery
            else ""
        )
    )
    f.outcome = SUPPORTED if strong and beyond else NOT_DETECTED
    part, text = _grounding(run)
    f.parts = {GROUNDING: part}
    f.detail += f"; {text}."
    return f


def _grounding(run: dict) -> tuple[str, str]:
    """The outcome and words of location's part "step t sits in block t"."""
    steps = run.get("grounding") or {}
    lines, held = [], []
    for step, e in sorted(steps.items(), key=lambda x: int(x[0])):
        blocks = {
            int(k): Estimate.from_dict(v)
            for k, v in (e.get("blocks") or {}).items()
            if v and v.get("lo") is not None
        }
        own = blocks.pop(int(step), None)
        if e.get("pairs", 0) < MIN_STEP_PAIRS or own is None or not blocks:
            lines.append(f"step {step}: {e.get('pairs', 0)} pairs change it alone (need {MIN_STEP_PAIRS})")
            continue
        rival = max(blocks, key=lambda k: blocks[k].hi)
        ok = all(own.above(b) for b in blocks.values())
        held.append(ok)
        lines.append(
            f"step {step} ({e['pairs']} pairs that change it alone): block {step} recovers {own}, "
            f"the best other, block {rival}, {blocks[rival]}"
            + ("" if ok else " (not below beyond both intervals)")
        )
    if not held:
        return NOT_TESTABLE, "whether step t sits in block t: " + (
            "; ".join(lines) or "no pairs change one step alone"
        )
    outcome = SUPPORTED if all(held) else NOT_DETECTED
    return outcome, "whether step t sits in block t: " + "; ".join(lines)


# The controls of the variables finding: the run card's entries at the best unit, and the control card's.
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
        "causal abstraction: IIA of DAS at each step variable's best unit and rank (chosen on training "
        "pairs) on held-out pairs, against the same unit's placebo, arbitrary-target and untrained DAS, "
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
        line, held = _variable_line(name, steps[name], iia, against[name])
        lines.append(line)
        if held is not None:
            outcomes.append(held)
    why = _untestable(run, control, needs_question=False) or _unreachable(run, MIN_IIA)
    if why or not outcomes:
        f.detail = "; ".join(lines) + (f"; but {why}." if why else ".")
        return f
    f.outcome = SUPPORTED if all(outcomes) and len(outcomes) == len(measured) else NOT_DETECTED
    f.detail = "; ".join(lines) + "."
    return f


def _variable_line(
    name: str, entry: dict, iia: Estimate | None, controls: dict[str, Estimate | None]
) -> tuple[str, bool | None]:
    """One step variable's line of the variables finding, and whether its IIA held against the bar
    and every control (None: not testable)."""
    if iia is None:
        return f"{name}: not testable ({entry.get('note') or 'no informative pairs'})", None
    site = entry.get("site") or {}
    step, block = entry.get("step"), site.get("block")
    where = entry.get("unit") or f"layer {site.get('layer')}, block {block}, slot {site.get('slot')}"
    grounded = (
        "in block t = step t"
        if block == step and not entry.get("group")
        else (f"blocks up to {block}" if entry.get("group") else f"not in block {step}")
    )
    shown_controls = ", ".join(f"{k} {v}" for k, v in controls.items() if v)
    full = estimate(entry, "full")
    line = f"{name} ({entry.get('label', name)}) is best at {where} ({grounded}), rank {entry.get('rank')}"
    line += f": IIA {iia}"
    line += (
        f" (the whole state there: {full}{'; DAS under-fit' if entry.get('underfit') else ''})"
        if full
        else ""
    )
    line += f"; {shown_controls}"
    missing = [k for k, v in controls.items() if v is None]
    if missing:
        return f"{line}: not testable (no {', '.join(missing)} figure)", None
    beaten = [k for k, v in controls.items() if not iia.above(v)]
    held = iia.above(MIN_IIA) and not beaten
    why = (
        "supported"
        if held
        else f"not above {MIN_IIA} beyond its interval"
        if not iia.above(MIN_IIA)
        else f"not above {', '.join(beaten)} beyond both intervals"
    )
    return f"{line}: {why}", held


def findings(run: dict, control: dict | None, calibration: dict | None = None) -> list[Finding]:
    """The five findings of a RiM run's card against its control's card (None: no control), each
    with its test's calibration at this n (`calibration.json`'s `findings`, if given)."""
    found = [
        necessity(run, control),
        sufficiency(run, control),
        decodability(run, control),
        location(run, control),
        variables(run, control),
    ]
    for f in found:
        f.calibration = (calibration or {}).get(f.name)
    return found


def text(run: dict, found: list[Finding]) -> str:
    """The verdict in plain language: one line per finding, then what the numbers do not show."""
    lines = [f.line() for f in found]
    if run.get("readout_sees_question") is False:
        lines.append(
            "Caveat: this model's readout cannot see the question (readout_sees_question: false), so every "
            "answer must pass through the blocks by construction; necessity and transfer are expected here, "
            "and the informative findings are where the information sits (location) and what the blocks "
            "encode (decodability)."
        )
    right = f" ({run['n_correct']} answered correctly)" if run.get("n_correct") is not None else ""
    lines.append(
        "What this does not show: probes are correlational; ablation, patching and interchange show that "
        "block states carry information the answer uses; causal abstraction tests one variable at one unit "
        "at a time, not that the whole computation inside the blocks follows the chain-of-thought steps; "
        f"these numbers come from {run.get('n')} held-out examples{right} of one task and model."
    )
    return "\n".join(lines)
