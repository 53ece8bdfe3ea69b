"""The causal report: do the memory blocks (or a Coconut model's continuous thoughts) carry the
reasoning?

`build_report` measures a RiM or Coconut run and its control (the `pause` run beside it by
default) the same way on the same examples: ablation, knockout, interchange, patching and
probes, plus the direct run's accuracy on those examples, and causal abstraction (the control at
the run's best sites). The other latent-reasoning runs beside it (`compared_runs`: Coconut
beside RiM, RiM beside Coconut) are measured the same way too and shown as further columns of
the card; the verdict is the run's against its control. A Coconut thought k is block k (one
slot), so every figure means the same for it. It saves every analysis under each run's
`analysis/` and writes `analysis/report.json` and `report.md`: a card of figures with 95%
intervals (`CARD` says how each is measured) and the verdict as five findings (`verdict`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rim_lens import artefacts
from rim_lens.analysis import conditional, verdict
from rim_lens.analysis.abstraction import RANKS
from rim_lens.analysis.backends import BACKENDS
from rim_lens.analysis.card import markdown
from rim_lens.analysis.causal import AblationResult, KnockoutResult
from rim_lens.analysis.interchange import InterchangeResult
from rim_lens.analysis.lab import Lab, Layers
from rim_lens.analysis.probes import ProbeResult
from rim_lens.analysis.registry import analysis
from rim_lens.analysis.results import plain
from rim_lens.data import Example
from rim_lens.data.causal import STEP
from rim_lens.errors import RimLensError, RunError
from rim_lens.fileio import atomic_write_json, atomic_write_text
from rim_lens.methods import DIRECT, PAUSE, latent_methods
from rim_lens.progress import progress
from rim_lens.runs import open_run
from rim_lens.stats import Estimate

REPORT_JSON, REPORT_MD = f"{artefacts.REPORT}.json", f"{artefacts.REPORT}.md"


def sibling(run_dir: str | Path, method: str) -> Path | None:
    """The run called `method` beside `run_dir` (how `rim-lens demo` lays runs out), if it has a model."""
    path = Path(run_dir).parent / str(method)
    return path if path != Path(run_dir) and (path / artefacts.MODEL).is_dir() else None


def compared_runs(run_dir: str | Path, control: str | Path | None = None) -> list[Path]:
    """The latent-reasoning runs beside `run_dir` that are neither it nor its control (default:
    the pause run beside it), in `methods.latent_methods` order: the further columns of its card."""
    control = Path(control) if control is not None else sibling(run_dir, PAUSE.name)
    found = [sibling(run_dir, m) for m in latent_methods()]
    return [p for p in found if p is not None and (control is None or p.resolve() != control.resolve())]


def control_of(run_dir: str | Path, report: dict | None = None) -> Path | None:
    """The control run of a report: the one it names (relative to the run), else the pause run beside it."""
    named = ((report or {}).get("control") or {}).get("run")
    if named:
        path = Path(named) if Path(named).is_absolute() else Path(run_dir) / named
        if (path / artefacts.MODEL).is_dir():
            return path.resolve()
    return sibling(run_dir, PAUSE.name)


def halves(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices split into the part a best cell is chosen on and the part it is scored on, by
    group (question), a `verdict.SELECT_FRACTION` share of the groups for choosing."""
    ids = np.unique(groups, return_inverse=True)[1]
    order = np.random.default_rng(0).permutation(ids.max() + 1)
    chosen = order[: int(round(len(order) * verdict.SELECT_FRACTION))]
    select = np.isin(ids, chosen)
    return np.flatnonzero(select), np.flatnonzero(~select)


def measure(
    lab: Lab,
    seed: int = 0,
    layers: Layers = None,
    probe_sets: tuple[Sequence[Example], Sequence[Example]] | None = None,
    descriptive: bool = True,
) -> dict:
    """The card of one session: every analysis run, saved under its run's analysis/, and its
    figures; the per-layer grids cover `layers` (default all). `probe_sets`: the (training,
    validation) examples conditional probes are fitted and chosen on. `descriptive`: also the
    figures no finding decides on (correctness and logistic value probes, attribution patching)."""
    done = {}
    bar = progress(desc=f"report: {lab.spec.method} card", total=6 if descriptive else 5, unit="step")
    ablation = lab.ablate(mode="mean", seed=seed)
    bar.step("ablation")
    knock = lab.knockout()
    bar.step("knockout")
    inter = lab.interchange(layers=layers, seed=seed)
    bar.step("interchange")
    results = [ablation, knock, inter]
    probe = lab.probe(layers=layers, seed=seed) if descriptive else None
    if probe:
        results.append(probe)
        bar.step("probes")
    for result in results:
        result.save(lab.out)
        done[result.record["analysis"]] = _cited(result.record)
    card = _card(lab, ablation, knock, inter, probe)
    card.update(_decodability(lab, probe_sets, seed, done, layers))
    bar.step("conditional probes")
    card.update(_patching(lab, seed, done, layers, descriptive))
    bar.step("patching")
    bar.close()
    card.update(_trained(lab))
    card["done"] = done
    card["record"] = {"model": lab.model_fingerprint}
    return plain(card)


def _card(
    lab: Lab,
    ablation: AblationResult,
    knock: KnockoutResult,
    inter: InterchangeResult,
    probe: ProbeResult | None,
) -> dict:
    """The card's entries from the ablation, knockout, interchange and (if run) probes; those of
    the later analyses start empty."""
    card = {
        "run": str(lab.run.path) if lab.run else "",
        "method": lab.spec.method,
        "n": len(lab.examples),
        "examples": lab.source,
        "backend": lab.backend.name,
        "readout_sees_question": lab.spec.readout_sees_question,
        "chance_accuracy": lab.task.chance_accuracy(),
        "accuracy_intact": ablation.accuracy("intact"),
        "n_correct": int(ablation.correct[0].sum()),
        "accuracy_all_blocks_ablated": ablation.accuracy("all"),
        "ablation_drop": ablation.drop(),
        "accuracy_answer_sees_no_block": knock.accuracy("answer->block", None),
        "accuracy_direct_baseline": None,
        "interchange_transfer_rate": inter.transfer("all"),
        "interchange_neither_rate": inter.summary["neither"],
        "interchange_changed_rate": inter.summary["changed"],
        "interchange_logprob_gain": inter.summary["logprob_gain"],
        "interchange_donor_tokens": inter.summary["donor_tokens"],
        "value_interchange": _value_interchange(inter, lab.spec.latent_blocks),
        "correctness_probe_auroc": probe.summary["correctness_auroc"] if probe else None,
        "best_value_probe": None,
        "best_value_probe_selectivity": None,
        "decodability_gain": None,
        "decodability_note": "",
        "patching_peak": None,
        "patching_peak_recovery": None,
        "patching_note": "",
        "patching_attribution_spearman": None,
        "blocks_carry_recovery": None,
        "blocks_carry_layer": None,
        "grounding": None,
    }
    if probe is not None:
        select, score = halves(probe.groups)
        best = probe.best(select_on=select, score_on=score)
        card["best_value_probe"] = {k: v for k, v in best.items() if k != "selectivity"} if best else None
        card["best_value_probe_selectivity"] = best["selectivity"] if best else None
    return card


def _trained(lab: Lab) -> dict:
    """The run's own test accuracy (with its interval) and input shares, from its metrics (if any)."""
    if not (lab.run and lab.run.exists(artefacts.METRICS)):
        return {}
    metrics = lab.run.read_json(artefacts.METRICS)
    ci = metrics.get("accuracy_ci")
    found = {"test_accuracy": metrics.get("accuracy")}
    if ci:
        found["test_accuracy"] = Estimate(metrics["accuracy"], *ci, metrics.get("n_eval", 0), "wilson")
    shares = metrics.get("input_share")
    if shares:
        found["input_share"] = " -> ".join(f"{name} {value:.3f}" for name, value in shares.items())
    return found


def _patching(lab: Lab, seed: int, done: dict, layers: Layers, descriptive: bool) -> dict:
    """The card's patching figures: the peak cell and the layer where the blocks carry the answer
    (chosen on half the pairs, scored on the other), the steps each pair changes, and with
    `descriptive` attribution patching's agreement."""
    out: dict = {}
    start = time.perf_counter()
    try:
        patched = lab.patch(layers=layers, seed=seed)
    except RimLensError as err:  # e.g. GSM8K: only synthetic tasks can corrupt their questions
        out["patching_note"] = str(err)
    else:
        out["patching_seconds"] = time.perf_counter() - start
        patched.save(lab.out)
        done["patch"] = _cited(patched.record)
        pairs = np.arange(len(patched.clean))
        select, score = (pairs[::2], pairs[1::2]) if len(pairs) > 1 else (None, None)
        peak = patched.peak(select_on=select, score_on=score)
        if peak:
            out["patching_peak"] = {k: v for k, v in peak.items() if k != "recovery"}
            out["patching_peak_recovery"] = peak["recovery"]
        carried = patched.carried(select_on=select, score_on=score)
        if carried:
            out["blocks_carry_layer"], out["blocks_carry_recovery"] = carried["layer"], carried["recovery"]
        steps = sorted({t for changed in patched.changed for t in changed})
        out["grounding"] = {
            str(t): {
                "pairs": sum(c == (t,) for c in patched.changed),
                "blocks": {str(k): e for k, e in patched.grounding(t).items()},
            }
            for t in steps
        }
        out["patching_logit_gap"] = (
            patched.summary["logit_diff_clean"] - patched.summary["logit_diff_corrupt"]
        )
        if descriptive:
            out.update(_attribution(lab, patched, seed, done, layers))
    return out


def _value_interchange(inter, K: int) -> dict:
    """Per step t, the matched/unmatched-value interchange at block t (where grounding put step t)
    and with every block swapped."""
    values = inter.values
    if values is None or not len(values):
        return {}
    out = {}
    for t in sorted(set(values["step"])):
        block = int(t) if int(t) <= K else None
        out[str(t)] = {
            "block": block,
            "matched_stays": inter.value_rate(t, "matched", block),
            "unmatched_moves": inter.value_rate(t, "unmatched", block),
            "every_block": {
                "matched_stays": inter.value_rate(t, "matched", None),
                "unmatched_moves": inter.value_rate(t, "unmatched", None),
            },
        }
    return out


def _decodability(lab: Lab, probe_sets, seed: int, done: dict, layers: Layers = None) -> dict:
    """The conditional probe's figures of the card (`conditional`), or a note why there are none."""
    from rim_lens.analysis.conditional import gain

    if not probe_sets:
        return {"decodability_note": "no training and validation examples to fit conditional probes on"}
    try:
        found = lab.conditional_probe(*probe_sets, layers=layers, seed=seed)
    except RimLensError as err:
        return {"decodability_note": str(err)}
    found.save(lab.out)
    done["probe_conditional"] = _cited(found.record)
    summary = found.summary
    out = {"decodability_gain": gain(summary), "decodability_cell": summary.get("chosen")}
    if summary.get("chosen"):
        out["decodability_scores"] = {k: summary[k] for k in ("question", "question_and_block")}
        out["decodability_curve"] = {str(k): v for k, v in summary["curve"].items()}
        out["decodability_sizes"] = {k: summary[k] for k in ("n_train", "n_val", "n_test")}
    else:
        out["decodability_note"] = summary.get("note", "")
    return out


def _attribution(lab: Lab, exact, seed: int, done: dict, layers: Layers = None) -> dict:
    """Attribution patching beside exact patching (`exact`, on the same pairs): saved, and the card's
    figures of their agreement and of its time (a first call includes booting the bridge)."""
    from rim_lens.analysis.attribution import agreement

    start = time.perf_counter()
    try:
        estimate = lab.patch(layers=layers, seed=seed, method="attribution")
    except RimLensError as err:  # e.g. no checkpoint directory to boot a TransformerBridge from
        return {"patching_attribution_note": str(err)}
    out = {
        "patching_attribution_seconds": time.perf_counter() - start,
        "patching_attribution_edges": estimate.summary["edges"],
    }
    estimate.save(lab.out)
    done["patch_attribution"] = _cited(estimate.record)
    try:
        out["patching_attribution_spearman"] = agreement(exact, estimate)
    except RimLensError as err:  # too few cells that change the metric to rank
        out["patching_attribution_note"] = str(err)
    return out


def measure_variables(
    lab: Lab, control: Lab | None, seed: int = 0, layers: Layers = None, descriptive: bool = True
) -> tuple[dict, dict | None]:
    """The figures of the variables finding: causal abstraction of the run's step variables (the
    ones the finding judges; `rim-lens analyze abstraction` also covers derived ones and the answer)
    with enough capacity (the probe map; DAS at the most promising site and jointly over every slot
    of blocks 1..t, ranks `abstraction.RANKS`; its controls and the full state at the best unit), and
    DAS on the control model at the run's best units; each saved under its run's analysis/.
    `descriptive`: also the held-out map of every (layer, block), which no finding decides on.
    Returns the entries of the run's card and the control's (`variables`: per variable, the best
    unit's IIA and its controls'; `variables_note`: why there are none)."""
    try:
        found = lab.task.causal_model().variables(lab.examples)
        steps = [v.name for v in found if v.kind == STEP]
        if not steps:
            raise RunError("the task's causal model has no step variables on these examples")
        result = lab.abstraction(steps, rank=RANKS, layers=layers, seed=seed, joint=True, grid=descriptive)
    except RimLensError as err:  # e.g. a task without a causal model
        return {"variables": None, "variables_note": str(err)}, None
    result.save(lab.out)
    run = {
        "variables": plain(result.summary["variables"]),
        "variables_note": "",
        "done": {"abstraction": _cited(result.record)},
    }
    sites = result.sites()
    if control is None or not sites:
        return run, None
    # The control model at each variable's best unit and rank: the same subspace size, fitted anew.
    ranks = {name: result.summary["variables"][name]["rank"] for name in sites}
    found = control.abstraction(list(sites), rank=ranks, sites=sites, grid=False, controls=False, seed=seed)
    found.save(control.out)
    return run, {
        "variables": plain(found.summary["variables"]),
        "done": {"abstraction": _cited(found.record)},
    }


def _cited(record: dict) -> dict:
    """What a report cites of an analysis: its selection, intervention and options."""
    options = {k: v for k, v in record.get("options", {}).items() if k not in ("examples",)}
    return {**options, "fingerprint": record.get("fingerprint")}


def _shown(report: dict) -> str:
    return report["verdict"]


@analysis(
    "report",
    on_run=True,
    stems=(artefacts.REPORT,),
    example="--n 200 --layers 1-2",
    choices={"backend": BACKENDS, "split": artefacts.SPLITS},
    help={
        "control": "control run (default: the sibling 'pause' run)",
        "direct": "direct-answer run for the baseline (default: the sibling 'direct' run)",
        "layers": "the layers of its per-layer grids (default: all)",
    },
    show=_shown,
)
def build_report(
    run_dir: str | Path,
    control: str | Path | None = None,
    direct: str | Path | None = None,
    backend: str = "hf",
    n: int = 200,
    seed: int = 0,
    split: str = "test",
    layers: Layers = None,
) -> dict:
    """Measure the run, its control and the runs compared with it (`compared_runs`) on the same
    examples, write report.json / report.md, return the report ({"run", "control", "compared",
    "findings", "verdict"}). `layers` limits the per-layer grids (probes, interchange, patching,
    abstraction) to those layers, for deep pretrained models; ablation and knockout always cover
    every layer."""
    run = open_run(run_dir)
    lab = Lab.open(run.path, backend=backend, n=n, split=split)
    lab.require_blocks()
    control_dir = Path(control) if control is not None else sibling(run.path, PAUSE.name)
    direct_dir = Path(direct) if direct is not None else sibling(run.path, DIRECT.name)
    control_lab = Lab.open(control_dir, backend=backend, examples=lab.examples) if control_dir else None
    sets = conditional.probe_sets(lab, split)
    report = {"run": measure(lab, seed, layers, sets), "control": None, "compared": []}
    if control_lab is not None:
        report["control"] = measure(control_lab, seed, layers, sets)
        report["control"]["examples"] = f"the same {len(lab.examples)} examples as the run"
    for other in compared_runs(run.path, control_dir):
        card = measure(Lab.open(other, backend=backend, examples=lab.examples), seed, layers, sets)
        report["compared"].append({**card, "examples": f"the same {len(lab.examples)} examples as the run"})
    for card, found in zip(
        (report["run"], report["control"]), measure_variables(lab, control_lab, seed, layers)
    ):
        if card is not None and found is not None:
            card["done"].update(found.pop("done", {}))
            card.update(found)
    if direct_dir is not None:
        direct_lab = Lab.open(direct_dir, backend=backend, examples=lab.examples)
        report["run"]["accuracy_direct_baseline"] = direct_lab.accuracy().to_dict()
    # Paths relative to the run itself, so the report survives moving the runs folder.
    for card in filter(None, (report["run"], report["control"], *report["compared"])):
        card["run"] = os.path.relpath(Path(card["run"]).resolve(), run.path.resolve())
    calibration, report["calibration"] = _calibration(lab)
    found = verdict.findings(report["run"], report["control"], calibration)
    report["findings"] = [f.to_dict() for f in found]
    report["verdict"] = verdict.text(report["run"], found)
    report = plain(report)
    atomic_write_json(lab.out / REPORT_JSON, report)
    atomic_write_text(lab.out / REPORT_MD, markdown(report))
    return report


def architecture(lab: Lab) -> dict:
    """What a calibration is made at: the model's shape, its memory layout and its task."""
    return {
        "layers": lab.backend.n_layers,
        "width": lab.backend.d_model,
        "K": lab.spec.K,
        "M": lab.spec.M,
        "task": lab.task.name,
        "options": dict(lab.task.options),
    }


def _calibration(lab: Lab) -> tuple[dict | None, dict]:
    """The run's calibration (`calibration.json`'s findings) if it was made at this report's n and
    architecture, and what the report says about it."""
    path = f"{artefacts.ANALYSIS}/{artefacts.CALIBRATION}"
    if lab.run is None or not lab.run.exists(path):
        return None, {"used": False, "note": f"no {path}: run `rim-lens analyze calibrate RUN`"}
    saved = lab.run.read_json(path)
    wanted = architecture(lab)
    if saved.get("n") != len(lab.examples) or saved.get("architecture") != wanted:
        note = (
            f"{path} was made for n = {saved.get('n')} and {saved.get('architecture')}, not "
            f"n = {len(lab.examples)} and {wanted}: run "
            f"`rim-lens analyze calibrate RUN --n {len(lab.examples)}`"
        )
        return None, {"used": False, "note": note}
    return saved["findings"], {"used": True, "seeds": saved.get("seeds"), "n": saved.get("n")}
