"""Calibration: what each finding's test detects at a run's n, on models whose truth is set.

A test that cannot say "yes" proves nothing by saying "no". `calibrate` builds, at the run's own
architecture (layers, width, K, M, tokenizer, task) and on the run's own examples (the report's n
test examples, and the training and validation examples its conditional probes use), the planted
models of `planted`: per seed s a positive P_s (every step stored in its block, with the question
there too) and its matched negative N_s (nothing stored; the readout computes every step from the
question). Each is measured exactly as the report measures a run (`report.measure`,
`report.measure_variables`, then `verdict.findings`) against the control N_{s+1} (the negative
of the next seed, cyclically: another draw of a model that stores nothing):

    detection        the share of seeds where the finding is supported on P_s
    false positive   the share of seeds where it is supported (or partial) on N_s

and likewise for a finding's parts (location's "step t sits in block t"). The figures no finding
decides on (correctness and logistic value probes, attribution patching) are not measured. The
result is `analysis/calibration.json`; the report reads it when it was made at the report's n and
architecture, and states each finding with its test's power (`verdict.shown`).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

from rim_lens import artefacts
from rim_lens.analysis import verdict
from rim_lens.analysis.conditional import probe_sets
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.planted import planted
from rim_lens.analysis.registry import analysis
from rim_lens.analysis.report import architecture, measure, measure_variables
from rim_lens.analysis.results import plain
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write_json
from rim_lens.runs import open_run

SEEDS = verdict.CALIBRATION_SEEDS
POSITIVE, NEGATIVE = "positive", "negative"


def planted_lab(lab: Lab, stored: tuple[int, ...] | None, seed: int, out: str | Path | None = None) -> Lab:
    """A session over a planted model at `lab`'s architecture, tokenizer, task and examples: the
    positive (`stored` None: every step in its block) or a negative (`stored=()`), its analyses
    written to `out`. Its readout sees the question (the paper's setting) whatever the run's does."""
    spec = dataclasses.replace(lab.spec, method="rim", readout_sees_question=True)
    model = planted(lab.tokenizer, spec, lab.task, lab.backend.n_layers, lab.backend.d_model, stored, seed)
    return Lab.from_model(model, lab.tokenizer, spec, lab.examples, task=lab.task, out=out)


def card(lab: Lab, sets, seed: int = 0) -> dict:
    """A planted model's card, measured as the report measures a run (without the figures no
    finding decides on)."""
    return measure(lab, seed, probe_sets=sets, descriptive=False)


def trial(run: Lab, control: Lab, cards: tuple[dict, dict], seed: int = 0) -> list[verdict.Finding]:
    """The five findings of `run` against `control`, given their `cards`: the variables finding is
    measured for the pair (the control at the run's best units), as the report does."""
    cards = copy.deepcopy(cards)
    for found_card, found in zip(cards, measure_variables(run, control, seed, descriptive=False)):
        if found is not None:
            found_card["done"].update(found.pop("done", {}))
            found_card.update(found)
    return verdict.findings(*cards)


def _shown(found: dict) -> str:
    lines = [f"each finding's test on planted models at n = {found['n']} ({found['seeds']} seeds):"]
    for name, f in found["findings"].items():
        lines.append(f"  {name}: detection {f['detection']:.2f}, false positive {f['false_positive']:.2f}")
        for part, p in f["parts"].items():
            lines.append(
                f"    {part}: detection {p['detection']:.2f}, false positive {p['false_positive']:.2f}"
            )
    where = Path(found["run"]) / artefacts.ANALYSIS / artefacts.CALIBRATION
    return "\n".join(lines + [f"written to {where} ({found['seconds']:.0f} s)"])


@analysis(
    "calibrate",
    on_run=True,
    stems=(Path(artefacts.CALIBRATION).stem,),
    example="--n 200 --seeds 5",
    choices={"split": artefacts.SPLITS},
    help={"seeds": f"planted seeds (default: {SEEDS}); each finding's detection and false-positive rate"},
    show=_shown,
)
def calibrate(
    run_dir: str | Path, n: int = 200, seeds: int = SEEDS, split: str = "test", seed: int = 0
) -> dict:
    """Detection and false-positive rates of every finding's test at `run_dir`'s architecture and
    n, over `seeds` planted seeds (module docstring); writes and returns `calibration.json`."""
    if seeds < 2:
        raise RunError("calibration needs 2 planted seeds or more (seed s is judged against seed s + 1)")
    start = time.perf_counter()
    run = open_run(run_dir)
    lab = Lab.open(run.path, n=n, split=split)
    lab.require_blocks()
    sets = probe_sets(lab, split)
    outcomes: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="rim-lens-planted-") as scratch:
        models = {
            (kind, s): planted_lab(lab, None if kind == POSITIVE else (), s, Path(scratch) / f"{kind}{s}")
            for s in range(seeds)
            for kind in (POSITIVE, NEGATIVE)
        }
        cards = {key: card(model, sets, seed) for key, model in models.items()}
        for s in range(seeds):
            other = (NEGATIVE, (s + 1) % seeds)
            for kind in (POSITIVE, NEGATIVE):
                found = trial(models[(kind, s)], models[other], (cards[(kind, s)], cards[other]), seed)
                _tally(outcomes, found, kind, s)
    findings = {name: _rates(found, seeds, len(lab.examples)) for name, found in outcomes.items()}
    result = {
        "run": str(run.path),
        "n": len(lab.examples),
        "seeds": seeds,
        "architecture": architecture(lab),
        "train": len(sets[0]) if sets else 0,
        "validation": len(sets[1]) if sets else 0,
        "bars": {"detection": verdict.MIN_DETECTION, "false_positive": verdict.MAX_FALSE_POSITIVE},
        "findings": findings,
        "seconds": time.perf_counter() - start,
    }
    result = plain(result)
    out = run.analysis_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / artefacts.CALIBRATION, result)
    return result


def _tally(outcomes: dict, found: list[verdict.Finding], kind: str, seed: int) -> None:
    """Add one trial's outcomes (and, on a positive, why a finding was not supported)."""
    for f in found:
        mine = outcomes.setdefault(f.name, {POSITIVE: [], NEGATIVE: [], "parts": {}, "details": []})
        mine[kind].append(f.outcome)
        if kind == POSITIVE and f.outcome != verdict.SUPPORTED:
            mine["details"].append(f"seed {seed}: {f.outcome}: {f.detail}")
        for name, o in f.parts.items():
            mine["parts"].setdefault(name, {POSITIVE: [], NEGATIVE: []})[kind].append(o)


def _rates(found: dict, seeds: int, n: int) -> dict:
    """Detection (supported on the positive) and false-positive (supported or partial on the
    negative) rates of one finding and its parts; why it misses, where it does."""

    def rates(pos: list[str], neg: list[str]) -> dict:
        return {
            "detection": sum(o == verdict.SUPPORTED for o in pos) / len(pos),
            "false_positive": sum(o in (verdict.SUPPORTED, verdict.PARTIAL) for o in neg) / len(neg),
            "seeds": seeds,
            "n": n,
            "outcomes": {POSITIVE: pos, NEGATIVE: neg},
        }

    out = rates(found[POSITIVE], found[NEGATIVE])
    out["parts"] = {name: rates(p[POSITIVE], p[NEGATIVE]) for name, p in found["parts"].items()}
    out["why"] = found["details"][0] if found["details"] else ""
    return out
