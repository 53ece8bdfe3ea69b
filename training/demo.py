"""`rim-lens demo`: generate the default task, train RiM and its baselines (direct, CoT, pause,
Coconut) on the same data and budget, score them side by side, time them in one interleaved
measurement, then run the causal report on the RiM run.

Runs: runs_dir/<method> (seed 0: the table, the latency and the report) and, with several seeds,
runs_dir/seed<s>/<method>. A completed run whose recipe is unchanged in the keys its method
reads is reused, an interrupted one resumes, so a killed demo picks up where it stopped. A run
the demo would replace (another recipe) is replaced only with `overwrite`: otherwise the demo
stops before it writes anything.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

from rim_lens import artefacts
from rim_lens.artefacts import SPLITS, split_file
from rim_lens.compare import comparison, latency_side_by_side, render
from rim_lens.data import Splits, write_examples
from rim_lens.data.tasks import get_task
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write_json, atomic_write_text
from rim_lens.methods import COCONUT, COT, DEMO_METHODS, DIRECT, PAUSE, RIM
from rim_lens.runs import Run

RECIPES = Path(str(resources.files("training") / "recipes"))
# Longest first, so that parallel jobs finish together.
TRAINING_ORDER = tuple(m.name for m in (RIM, PAUSE, COCONUT, COT, DIRECT))


def recipe_path(full: bool) -> Path:
    return RECIPES / ("demo_full.yaml" if full else "demo.yaml")


def run_dir(runs_dir: Path, method: str, seed: int) -> Path:
    """Where the demo trains `method` with seed offset `seed`."""
    return runs_dir / method if seed == 0 else runs_dir / f"seed{seed}" / method


def _train_one(recipe: Path, overrides: list[str], path: Path, quiet: bool, overwrite: bool) -> dict:
    """Train (or reuse, or resume) one run; its metrics. Top level: parallel jobs pickle it."""
    from training.config import load_config
    from training.trainer import train

    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # parallel jobs would interleave their progress bars
    cfg = load_config(recipe, overrides)
    if _reusable(cfg, Run(path)):
        print(f"demo: {path} is complete with this recipe; reusing it")
        return Run(path).read_json("metrics.json")
    return train(cfg, path, overwrite=overwrite).read_json("metrics.json")


def _reusable(cfg, run: Run) -> bool:
    from training.trainer import recipe_change

    return run.status().get("status") == "completed" and recipe_change(cfg, run) is None


def check_runs(recipe: Path, planned: list[tuple[str, int, Path, list[str]]], overwrite: bool) -> None:
    """RunError, before anything is trained or written, if a planned run may not be trained into
    its directory: a completed run of another recipe (without `overwrite`), an interrupted one of
    another recipe, or a folder that is no rim-lens run."""
    from training.config import load_config
    from training.trainer import plan_run, recipe_change

    for _, _, path, overrides in planned:
        cfg, run = load_config(recipe, overrides), Run(path)
        if not run.path.exists() or _reusable(cfg, run):
            continue
        if run.status().get("status") == "completed" and not overwrite:
            raise RunError(
                f"{path}: holds a completed run trained with another recipe ({recipe_change(cfg, run)}); "
                "the demo replaces it only with --overwrite; or give another --runs-dir"
            )
        plan_run(cfg, run, overwrite, restart=False)


def gap_closure(metrics: dict[str, dict]) -> dict | None:
    """How much of the direct -> CoT gap RiM closes, and the demo's bar on intervals: RiM's lower
    bound above the gap's midpoint and above pause's upper bound (None without those runs)."""
    if not {RIM.name, DIRECT.name, COT.name} <= set(metrics):
        return None
    rim, direct, cot = (metrics[m]["accuracy"] for m in (RIM.name, DIRECT.name, COT.name))
    if cot <= direct:
        return {"closed": None, "note": "CoT is not above direct: there is no gap to close"}
    rim_lo = metrics[RIM.name]["accuracy_ci"][0]
    midpoint = (direct + cot) / 2
    out = {
        "closed": (rim - direct) / (cot - direct),
        "midpoint": midpoint,
        "rim_lo_above_midpoint": rim_lo > midpoint,
    }
    if PAUSE.name in metrics:
        out["pause_hi"] = metrics[PAUSE.name]["accuracy_ci"][1]
        out["rim_lo_above_pause_hi"] = rim_lo > out["pause_hi"]
    return out


def k_curve(metrics: dict) -> str:
    """RiM's accuracy (on the split it was scored on) reading the answer after block k = 1..K, as
    one table row each. With the question visible and causal attention, the answer after block k
    sees exactly what a model given only k blocks sees, so this is the accuracy at budget K = k."""
    rows = [f"| K | {metrics.get('scored_on', 'test')} accuracy [95% CI] |", "|---|---|"]
    for k, (value, (lo, hi)) in enumerate(
        zip(metrics["per_block_accuracy"], metrics["per_block_accuracy_ci"]), 1
    ):
        rows.append(f"| {k} | {value:.3f} [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(rows)


def seed_table(per_seed: dict[str, list[float]], split: str = "test") -> str:
    """Mean ± sd of each method's accuracy on `split` over its seeds."""
    rows = [f"| method | {split} accuracy, mean ± sd over seeds | seeds |", "|---|---|---|"]
    for method, values in per_seed.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(f"| {method} | {statistics.mean(values):.3f} ± {sd:.3f} | {len(values)} |")
    return "\n".join(rows)


def seed_verdicts(per_seed_metrics: list[dict[str, dict]]) -> list[dict | None]:
    """`gap_closure` of every seed's own runs (None for a seed without direct, CoT and RiM)."""
    return [gap_closure(metrics) for metrics in per_seed_metrics]


def verdict_table(per_seed_metrics: list[dict[str, dict]], split: str = "test") -> str:
    """Per seed: each method's accuracy, how much of that seed's direct -> CoT gap RiM closes, and
    whether RiM clears the bar on that seed (its lower bound above the seed's gap midpoint and
    above the seed's pause upper bound); then on how many seeds it does."""
    methods = [m for m in TRAINING_ORDER[::-1] if any(m in seed for seed in per_seed_metrics)]
    head = " | ".join(f"{m} {split}" for m in methods)
    rows = [f"| seed | {head} | RiM closes | midpoint | RiM lower bound | pause upper | clears |"]
    rows.append("|---" * (len(methods) + 6) + "|")
    cleared = counted = 0
    for s, (metrics, gap) in enumerate(zip(per_seed_metrics, seed_verdicts(per_seed_metrics))):
        cells = [f"{metrics[m]['accuracy']:.3f}" if m in metrics else "–" for m in methods]
        if not gap or gap.get("closed") is None:
            rows.append(f"| {s} | {' | '.join(cells)} | – | – | – | – | – |")
            continue
        clears = gap["rim_lo_above_midpoint"] and gap.get("rim_lo_above_pause_hi", True)
        counted += 1
        cleared += bool(clears)
        pause = f"{gap['pause_hi']:.3f}" if "pause_hi" in gap else "–"
        rows.append(
            f"| {s} | {' | '.join(cells)} | {gap['closed']:.0%} | {gap['midpoint']:.3f} | "
            f"{metrics[RIM.name]['accuracy_ci'][0]:.3f} | {pause} | {'yes' if clears else 'no'} |"
        )
    rows.append(f"\nRiM clears the bar on {cleared} of {counted} seeds.")
    return "\n".join(rows)


def gap_line(gap: dict) -> str:
    """The sentence the demo's table ends with: how much of the gap RiM closes, against its bars."""
    if "note" in gap:
        return gap["note"] + "."
    line = f"RiM closes {gap['closed']:.0%} of the direct -> CoT gap; its lower bound is "
    line += ("above" if gap["rim_lo_above_midpoint"] else "NOT above") + " the gap's midpoint"
    if "pause_hi" in gap:
        line += " and " + ("above" if gap["rim_lo_above_pause_hi"] else "NOT above") + " pause's upper bound"
    return line + "."


def _train_all(recipe: Path, planned: list, jobs: int, overwrite: bool) -> dict[tuple[str, int], dict]:
    """Train every planned (method, seed offset, run directory, overrides), `jobs` at a time;
    each run's metrics by (method, seed offset)."""
    if jobs <= 1:
        return {(m, s): _train_one(recipe, o, path, False, overwrite) for m, s, path, o in planned}
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            (m, s): pool.submit(_train_one, recipe, o, path, True, overwrite) for m, s, path, o in planned
        }
        return {key: f.result() for key, f in futures.items()}


def _write_data(recipe: Path, runs_dir: Path, splits: Splits, plan: Callable, overwrite: bool) -> None:
    """Write the demo's data splits under runs_dir, once every run `plan(folder)` makes has been
    checked against them (a run of another recipe is replaced only with `overwrite`)."""
    with tempfile.TemporaryDirectory() as staged:
        for name in SPLITS:
            write_examples(Path(staged) / split_file(name), getattr(splits, name))
        try:
            check_runs(recipe, plan(Path(staged)), overwrite)
        except RunError as err:  # name the data files where the demo would write them
            raise RunError(str(err).replace(staged, str(runs_dir))) from None
    for name in SPLITS:
        write_examples(runs_dir / split_file(name), getattr(splits, name))


def _report(runs_dir: Path, metrics: dict) -> str:
    """The causal report of the demo's RiM run against its pause and direct runs; its verdict."""
    from rim_lens.analysis.report import build_report

    card = build_report(
        runs_dir / RIM.name,
        control=runs_dir / PAUSE.name if PAUSE.name in metrics else None,
        direct=runs_dir / DIRECT.name if DIRECT.name in metrics else None,
    )
    where = runs_dir / RIM.name / artefacts.ANALYSIS / "report.md"
    print(f"\nDo the memory blocks carry the reasoning? ({where})\n" + card["verdict"])
    return card["verdict"]


def _data_sizes(splits: Splits, task) -> str:
    """The demo's data in words: each split's size, and the share of the task's questions it covers."""
    coverage = splits.coverage(task)
    sizes = ", ".join(f"{len(getattr(splits, name))} {name}" for name in SPLITS)
    covered = f" ({coverage:.0%} of the task's questions)" if coverage else ""
    return f"{sizes} examples{covered}"


def _save(runs_dir: Path, summary: dict, table: str) -> None:
    """Write the summary (summary.json) and its table (summary.md) under runs_dir, and say so."""
    atomic_write_json(runs_dir / "summary.json", summary)
    atomic_write_text(runs_dir / "summary.md", table + "\n")
    print(f"\ndemo finished in {summary['seconds_total'] / 60:.1f} min; everything is under {runs_dir}/")


def _compare(
    runs_dir: Path,
    metrics: dict[str, dict],
    results: dict[tuple[str, int], dict],
    seeds: int,
    seeds_of: dict[str, int],
    latency_examples: int,
) -> tuple[dict, str]:
    """Seed 0's runs (`metrics`) side by side, timed in one interleaved measurement, with RiM's
    accuracy by budget and the gap it closes; with several seeds, each seed's accuracies and
    verdict. Returns the summary's entries for them and the Markdown table."""
    latency = None
    if latency_examples and len(metrics) > 1:
        print(f"demo: timing {', '.join(metrics)} side by side on {latency_examples} test questions")
        latency = latency_side_by_side({m: runs_dir / m for m in metrics}, n=latency_examples)
    rows = comparison(metrics, latency)
    sections = [render(rows)]
    per_seed = {m: [results[(m, s)]["accuracy"] for s in range(seeds_of[m])] for m in metrics}
    per_seed_metrics = [{m: results[(m, s)] for m in metrics if (m, s) in results} for s in range(seeds)]
    if seeds > 1:
        split = next(iter(metrics.values())).get("scored_on", "test")
        sections.append(seed_table(per_seed, split))
        sections.append(verdict_table(per_seed_metrics, split))
    if RIM.name in metrics and metrics[RIM.name].get("per_block_accuracy"):
        sections.append(
            "RiM's accuracy by memory budget K (answer read after block K):\n\n" + k_curve(metrics[RIM.name])
        )
    gap = gap_closure(metrics)
    if gap:
        sections.append(gap_line(gap))
    entries = {
        "rows": rows,
        "per_seed_accuracy": per_seed,
        "gap": gap,
        "per_seed_gap": seed_verdicts(per_seed_metrics),
        "latency": latency,
    }
    return entries, "\n\n".join(sections)


def run_demo(
    runs_dir: str | Path = "runs/demo",
    full: bool = False,
    methods: tuple[str, ...] = DEMO_METHODS,
    report: bool = True,
    overrides: list[str] | None = None,
    recipe: str | Path | None = None,
    seeds: int = 1,
    jobs: int = 1,
    latency_examples: int = 30,
    method_seeds: dict[str, int] | None = None,
    overwrite: bool = False,
) -> dict:
    """Train and compare the methods of the demo recipe (or `recipe`) over `seeds` training seeds
    (`method_seeds`: fewer for some methods, e.g. 1 for coconut), `jobs` runs at a time; returns
    the summary written to runs_dir. A run of another recipe is replaced only with `overwrite`."""
    from training.config import load_config
    from training.trainer import load_data

    start = time.perf_counter()
    runs_dir = Path(runs_dir)
    recipe = Path(recipe) if recipe else recipe_path(full)
    overrides = list(overrides or [])
    base = load_config(recipe, overrides)
    task = get_task(base.task.name, **base.task.options)
    splits = load_data(base, task)

    seeds_of = {m: (method_seeds or {}).get(m, seeds) for m in methods}

    def plan(folder: Path) -> list[tuple[str, int, Path, list[str]]]:
        """(method, seed offset, run directory, recipe overrides) of every run, on the data in `folder`."""
        data = [f"data.{name}={folder / split_file(name)}" for name in SPLITS]
        return [
            (str(m), s, run_dir(runs_dir, m, s), [*overrides, f"method={m}", f"seed={base.seed + s}", *data])
            for s in range(seeds)
            for m in TRAINING_ORDER
            if m in methods and s < seeds_of[m]
        ]

    _write_data(recipe, runs_dir, splits, plan, overwrite)
    print(f"demo: task {task!r}, {_data_sizes(splits, task)}, recipe {recipe.name}")

    results = _train_all(recipe, plan(runs_dir), jobs, overwrite)
    seconds_training = time.perf_counter() - start
    metrics = {m: results[(m, 0)] for m in methods if (m, 0) in results}
    compared, table = _compare(runs_dir, metrics, results, seeds, seeds_of, latency_examples)
    summary = {
        "recipe": recipe.name,
        "task": repr(task),
        "splits": splits.summary(task),
        "seeds": seeds,
        **compared,
        "seconds_training": seconds_training,
    }
    print("\n" + table)
    if report and RIM.name in metrics:
        summary["verdict"] = _report(runs_dir, metrics)
    summary["seconds_total"] = time.perf_counter() - start
    _save(runs_dir, summary, table)
    return summary
