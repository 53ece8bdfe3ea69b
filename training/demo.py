"""`rim-lens demo`: generate the default task, train RiM and its baselines (direct, CoT, pause,
Coconut) on the same data and budget, evaluate them side by side, then run the causal report on
the RiM run."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rim_lens.artefacts import SPLITS, split_file
from rim_lens.compare import comparison, render
from rim_lens.data import write_examples
from rim_lens.data.tasks import get_task
from rim_lens.fileio import atomic_write_json, atomic_write_text
from rim_lens.methods import METHODS

RECIPES = Path(str(resources.files("training") / "recipes"))


def recipe_path(full: bool) -> Path:
    return RECIPES / ("demo_full.yaml" if full else "demo.yaml")


def run_demo(
    runs_dir: str | Path = "runs/demo",
    full: bool = False,
    methods: tuple[str, ...] = METHODS,
    report: bool = True,
    overrides: list[str] | None = None,
) -> dict:
    """Train and compare the methods of the demo recipe; returns the summary written to runs_dir."""
    from training.config import load_config
    from training.trainer import load_data, train

    start = time.perf_counter()
    runs_dir = Path(runs_dir)
    recipe = recipe_path(full)
    base = load_config(recipe, overrides)
    task = get_task(base.task.name, **base.task.options)
    splits = load_data(base, task)
    files = {name: runs_dir / split_file(name) for name in SPLITS}
    for name, path in files.items():
        write_examples(path, getattr(splits, name))
    sizes = ", ".join(f"{len(getattr(splits, name))} {name}" for name in SPLITS)
    print(f"demo: task {task!r}, {sizes} examples, recipe {recipe.name}")

    metrics = {}
    for method in methods:
        cfg = load_config(
            recipe,
            (overrides or [])
            + [
                f"method={method}",
                *(f"data.{name}={path}" for name, path in files.items()),
            ],
        )
        run = train(cfg, runs_dir / method, overwrite=True)
        metrics[method] = run.read_json("metrics.json")
    rows = comparison(metrics)
    table = render(rows)
    summary = {
        "recipe": recipe.name,
        "task": repr(task),
        "rows": rows,
        "seconds_training": time.perf_counter() - start,
    }
    print("\n" + table)
    if report and "rim" in metrics:
        from rim_lens.analysis.report import build_report

        card = build_report(
            runs_dir / "rim",
            control=runs_dir / "pause" if "pause" in metrics else None,
            direct=runs_dir / "direct" if "direct" in metrics else None,
        )
        summary["verdict"] = card["verdict"]
        print(
            f"\nDo the memory blocks carry the reasoning? ({runs_dir / 'rim' / 'analysis' / 'report.md'})\n"
            + card["verdict"]
        )
    summary["seconds_total"] = time.perf_counter() - start
    atomic_write_json(runs_dir / "summary.json", summary)
    atomic_write_text(runs_dir / "summary.md", table + "\n")
    print(f"\ndemo finished in {summary['seconds_total'] / 60:.1f} min; everything is under {runs_dir}/")
    return summary
