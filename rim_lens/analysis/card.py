"""The report's card and report.md: every figure the report measures, how it is measured and how it
is shown, and the markdown that lays the findings, the card and the variables out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rim_lens import artefacts
from rim_lens.analysis import verdict
from rim_lens.analysis.abstraction import UNDERFIT
from rim_lens.methods import get_method
from rim_lens.stats import Estimate

REPORT_JSON, REPORT_MD = f"{artefacts.REPORT}.json", f"{artefacts.REPORT}.md"


@dataclass(frozen=True)
class Row:
    """A figure of the card: its key, its label, and how it is measured."""

    key: str
    label: str
    how: str


# The card, in order: the one definition of its keys, labels and measurements.
CARD = (
    Row(
        "accuracy_intact", "accuracy, blocks intact", "teacher-forced exact match (= greedy decoding); Wilson"
    ),
    Row(
        "accuracy_all_blocks_ablated",
        "accuracy, every block mean-ablated",
        "the same, every block state (all layers and slots) set to its mean over the examples",
    ),
    Row(
        "n_correct",
        "examples answered correctly",
        "blocks intact, teacher-forced; the analyses use right and wrong",
    ),
    Row("ablation_drop", "drop under ablation", "intact - ablated, paired bootstrap over examples"),
    Row(
        "accuracy_answer_sees_no_block",
        "accuracy, answer sees no block",
        "the same, every readout->block attention edge removed in every layer",
    ),
    Row(
        "accuracy_direct_baseline",
        "direct-answer baseline",
        "the direct run beside it, teacher-forced on the same examples",
    ),
    Row(
        "interchange_transfer_rate",
        "interchange: output becomes the donor's answer",
        "B given all of A's block states, scored on A's answer; Wilson over pairs",
    ),
    Row(
        "interchange_changed_rate",
        "interchange: output changes",
        "B given all of A's block states: B's output is no longer the model's own; Wilson over pairs",
    ),
    Row(
        "interchange_logprob_gain",
        "interchange: gain in log p(A's answer)",
        "the same swap: A's answer's log-prob (nats) swapped - intact, paired bootstrap over pairs",
    ),
    Row(
        "interchange_donor_tokens",
        "interchange: answer tokens that take A's value",
        "the same swap, greedy output: the share of answer tokens where A's and B's outputs differ that take "
        "A's; bootstrap over pairs",
    ),
    Row(
        "decodability_gain",
        "conditional probe: what a block adds to the question",
        "digit accuracy of a ridge probe on [question states; block states] - on question states alone; "
        "fitted on training-split states, cell chosen on validation, scored here; bootstrap over questions",
    ),
    Row(
        "best_value_probe_selectivity",
        "best value-probe selectivity (descriptive)",
        "score - control task; cell chosen on half the examples, scored on the other; bootstrap over "
        "questions",
    ),
    Row(
        "correctness_probe_auroc", "correctness-probe AUROC", "out of fold, the best layer's mean over blocks"
    ),
    Row(
        "blocks_carry_recovery",
        "patching every block: recovery",
        "every block patched at the layer best on half the pairs, recovery on the other; bootstrap "
        "over pairs",
    ),
    Row(
        "patching_peak_recovery",
        "patching: peak recovery (one cell)",
        "peak (layer, block) chosen on half the pairs, recovery on the other; bootstrap over pairs",
    ),
    Row(
        "patching_attribution_spearman",
        "attribution patching: agreement with exact",
        "Spearman over (layer, block) cells, attribution (2 forward + 1 backward passes) vs exact patching "
        "on the same pairs; cells both leave unchanged left out; bootstrap over pairs",
    ),
    Row(
        "input_share",
        "input share of block-state variance: before training -> after each stage",
        "input variance / (input + between-block variance) of block states, mean over layers, on 64 "
        "validation questions (the paper's PCA finding: collapsed by grounding, then spread; "
        "rim_lens/model/spread.py)",
    ),
    Row(
        "test_accuracy",
        "test accuracy (metrics.json)",
        "greedy decoding on the whole test split, `rim-lens eval`",
    ),
    Row("chance_accuracy", "chance accuracy", "the task's (uniform over its answers)"),
    Row("n", "examples", "the first n of the run's test split; the control and direct runs use the same"),
)


KEYS = tuple(row.key for row in CARD)


def format_value(value) -> str:
    """A card figure as shown everywhere: an interval as `0.950 [0.900, 0.980]`, a rate to three
    decimals, a missing one as `–`."""
    if value is None:
        return "–"
    if isinstance(value, dict) and "lo" in value:
        if value.get("value") is None:
            return "–"
        return format_value(value["value"]) if value.get("lo") is None else str(Estimate.from_dict(value))
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def percent(x) -> str:
    """A rate as a percentage with one decimal (`–` if missing)."""
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def card_value(card: dict | None, key: str) -> str:
    """One figure of a card as shown in report.md and on the dashboard (patching names its cell)."""
    if not card:
        return "–"
    shown = format_value(card.get(key))
    peak = card.get("patching_peak")
    if key == "patching_peak_recovery" and peak:
        shown += f" @ layer {peak['layer']}, block {peak['block']}"
    if key == "best_value_probe_selectivity" and card.get("best_value_probe"):
        best = card["best_value_probe"]
        shown += f" (step {best['step']}, block {best['block']}, layer {best['layer']})"
    if key == "decodability_gain" and card.get("decodability_cell"):
        best = card["decodability_cell"]
        shown += f" (step {best['step']}, block {best['block']}, layer {best['layer']})"
    if key == "blocks_carry_recovery" and card.get("blocks_carry_layer") is not None:
        shown += f" @ layer {card['blocks_carry_layer']}"
    return shown


def markdown(report: dict) -> str:
    """report.md: the findings, the card with how each figure was measured, the variables, what was done."""
    r, c, others = report["run"], report["control"], report.get("compared") or []
    thoughts = get_method(r["method"]).uses_thoughts
    lines = [f"# Do the {'continuous thoughts' if thoughts else 'memory blocks'} carry the reasoning?", ""]
    lines += [
        "## Verdict",
        "",
        "| finding | outcome | run | control | its test on planted models at this n |",
        "|---|---|---|---|---|",
    ]
    for f in map(verdict.Finding.from_dict, report.get("findings", [])):

        def shown(values: dict[str, Estimate]) -> str:
            return "; ".join(f"{k} {v}" for k, v in values.items()) or "–"

        outcome = f"**{f.outcome}**" + "".join(f"; {name}: **{o}**" for name, o in f.parts.items())
        lines.append(f"| {f.name} | {outcome} | {shown(f.run)} | {shown(f.control)} | {calibrated(f)} |")
    note = (report.get("calibration") or {}).get("note")
    lines += [
        "",
        f"Calibration: {note}." if note else "",
        *[f"- {line}" for line in report["verdict"].splitlines()],
        "",
    ]
    lines += ["## The card", ""]
    columns = [(f"{r['method']} ({r['run']})", r)]
    columns += [(f"control: {c['method']} ({c['run']})", c)] if c else []
    columns += [(f"{o['method']} ({o['run']})", o) for o in others]
    lines += ["| figure | how it is measured | " + " | ".join(name for name, _ in columns) + " |"]
    lines += ["|---|---|" + "---|" * len(columns)]
    for row in CARD:
        lines.append(
            f"| {row.key} | {row.how} | " + " | ".join(card_value(x, row.key) for _, x in columns) + " |"
        )
    lines += ["", f"Examples: {r.get('examples')}; backend {r.get('backend')}."]
    if any(get_method(x["method"]).uses_thoughts for _, x in columns):
        lines += [
            "For Coconut, block k is continuous thought k (one slot): an intervention there is applied "
            "in the pass that computes it, so every later thought is recomputed from it."
        ]
    lines += [""]
    lines += variables_table(r, c)
    lines += ["## What was done", ""]
    for who, card in (("run", r), ("control", c), *((o["method"], o) for o in others)):
        for what, options in ((card or {}).get("done") or {}).items():
            cited = ", ".join(f"{k} `{_short(v)}`" for k, v in options.items() if v is not None)
            lines.append(f"- {who}, {what}: {cited}")
    return "\n".join(lines) + "\n"


def calibrated(finding: verdict.Finding) -> str:
    """A finding's calibration as report.md's verdict table shows it: detection on planted carriers
    and false positives on planted non-carriers (with its parts'), or why there is none."""
    c = finding.calibration
    if not c or c.get("detection") is None:
        return "not calibrated"
    shown = f"detects {c['detection']:.2f}, false positives {c['false_positive']:.2f} ({c['seeds']} seeds)"
    for name, part in (c.get("parts") or {}).items():
        shown += f"; {name}: detects {part['detection']:.2f}, false positives {part['false_positive']:.2f}"
    if c["detection"] < verdict.MIN_DETECTION or c["false_positive"] > verdict.MAX_FALSE_POSITIVE:
        shown += f" (below the bar: {c.get('why') or 'see calibration.json'})"
    return shown


def variables_table(run: dict, control: dict | None) -> list[str]:
    """report.md's section on the variables finding: per variable its best site, its IIA and its
    controls' (`abstraction`)."""
    entries = run.get("variables")
    lines = ["## Variables: causal abstraction", ""]
    if not entries:
        return [*lines, f"Not run: {run.get('variables_note') or 'no variables'}.", ""]
    lines += [
        "IIA: how often the output becomes the causal model's answer with the variable taken from the "
        "other question, interchanging a DAS subspace at the variable's best unit and rank (a site, or "
        "every slot of blocks 1..t at one layer fitted jointly; ranks swept; chosen on training pairs), on "
        "held-out pairs; 95% Wilson intervals. Controls at the same unit and rank. Whole state: the full "
        'interchange at the same sites (DAS "under-fit" when its training IIA is more than '
        f"{UNDERFIT} below it). Gain: how far the interchange raises the counterfactual answer's mean "
        "log-prob (nats), graded where IIA is 0.",
        "",
        "| variable | best unit | rank | IIA | whole state there | placebo | arbitrary targets "
        "| untrained copy | control model | gain: DAS / placebo / arbitrary / untrained / control "
        "| pairs (training / held-out) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        site = e.get("site")
        where = e.get("unit") or (
            f"layer {site['layer']}, block {site['block']}, slot {site['slot']}" if site else "–"
        )
        pause = ((control or {}).get("variables") or {}).get(name) or {}
        full = format_value(e.get("full")) + (" (DAS under-fit)" if e.get("underfit") else "")
        figures = [format_value(e.get("iia")), full]
        figures += [format_value(e.get(k)) for k in verdict.VARIABLE_CONTROLS] + [
            format_value(pause.get("iia"))
        ]
        gains = {**(e.get("gain") or {}), "control": (pause.get("gain") or {}).get("iia")}
        gain = " / ".join(format_value(gains.get(k)) for k in ("iia", *verdict.VARIABLE_CONTROLS, "control"))
        lines.append(
            f"| {name} ({e.get('label')}) | {where} | {e.get('rank') or '–'} | {' | '.join(figures)} "
            f"| {gain} | {e.get('pairs_train')} / {e.get('pairs_test')} |"
        )
    return [*lines, ""]


def _short(value):
    """A cited option as shown in report.md: long lists (e.g. patch sources) by their length."""
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} items]"
    return value
