"""`rim-lens demo`: generate the default task, train RiM and its three baselines on the same
data and budget, evaluate them side by side, then run the causal report on the RiM run."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rim_lens.artefacts import SPLITS, split_file
from rim_lens.data import write_examples
from rim_lens.data.tasks import get_task
from rim_lens.fileio import atomic_write_json, atomic_write_text
from rim_lens.methods import METHODS

RECIPES = Path(str(resources.files("training") / "recipes"))


def recipe_path(full: bool) -> Path:
    return RECIPES / ("demo_full.yaml" if full else "demo.yaml")


def comparison(metrics: dict[str, dict]) -> list[dict]:
    """One row per method: accuracy, any-block accuracy, answer tokens, latency ratios vs direct."""
    base = metrics.get("direct", {})
    rows = []
    for name, m in metrics.items():

        def ratio(key: str, m: dict = m) -> float | None:
            return m[key] / base[key] if base.get(key) and m.get(key) else None

        rows.append(
            {
                "method": name,
                "accuracy": m["accuracy"],
                "any_block_accuracy": m.get("any_block_accuracy"),
                "answer_tokens": m["answer_tokens_mean"],
                "forward_passes": m["forward_passes_mean"],
                "ttft_ms": m.get("ttft_ms"),
                "latency_ms": m.get("latency_ms"),
                "ttft_vs_direct": ratio("ttft_ms"),
                "latency_vs_direct": ratio("latency_ms"),
                "train_time_s": m.get("train_time_s"),
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| method | accuracy (final block) | any-block | answer tokens | forward passes | TTFT ms | latency ms | TTFT / direct | latency / direct | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {f(r['accuracy'], '.3f')} | {f(r['any_block_accuracy'], '.3f')} | {f(r['answer_tokens'], '.1f')} | "
            f"{f(r['forward_passes'], '.1f')} | {f(r['ttft_ms'], '.2f')} | {f(r['latency_ms'], '.2f')} | "
            f"{f(r['ttft_vs_direct'], '.2f')} | {f(r['latency_vs_direct'], '.2f')} | {f(r['train_time_s'], '.0f')} |"
        )
    return "\n".join(lines)


def run_demo(
    runs_dir: str | Path = "runs/demo",
    full: bool = False,
    methods: tuple[str, ...] = METHODS,
    report: bool = True,
    overrides: list[str] | None = None,
    recipe: str | Path | None = None,
) -> dict:
    """Train and compare the methods of the demo recipe (or `recipe`); returns the summary written
    to runs_dir."""
    from training.config import load_config
    from training.trainer import load_data, train

    start = time.perf_counter()
    runs_dir = Path(runs_dir)
    recipe = Path(recipe) if recipe else recipe_path(full)
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
