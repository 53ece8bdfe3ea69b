"""Training cost per optimizer step of every method and stage, side by side, at equal batch.

    python bench/train_step.py [--recipe training/recipes/demo.yaml] [--repeat 10] [--threads 1]

For each method the recipe's model is built and its stages planned exactly as `rim-lens train`
does (`training.trainer.plan_stages`); every stage gets one fixed batch of the same training
examples (the recipe's batch size). One timed step is the stage's loss (one forward pass, or
Coconut's n + 1 thought passes), backward and an AdamW step. Steps are interleaved over all
(method, stage) pairs in an order that rotates each round, so machine noise hits all alike;
medians are reported. A method's s/step over a whole run weights its stages by their steps.
Coconut's extra cost is its n + 1 sequential passes per step (n = thoughts in the stage).

Writes bench/results/train_step.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DEFAULT_RECIPE = HERE.parent / "training" / "recipes" / "demo.yaml"
DEFAULT_OUT = HERE / "results" / "train_step.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe (default: the demo's)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per stage (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per stage first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def prepare(recipe: str, overrides: list[str], method: str) -> list[dict]:
    """One entry per stage of `method`: model, optimizer, loss, fixed batch and weights."""
    import torch

    from rim_lens.data.tasks import get_task
    from rim_lens.model.layouts import Role, SequenceBuilder, collate
    from training.config import load_config
    from training.trainer import _loss, all_texts, load_data, make_model, plan_stages, run_spec

    cfg = load_config(recipe, overrides + [f"method={method}"])
    task = get_task(cfg.task.name, **cfg.task.options)
    splits = load_data(cfg, task)
    spec = run_spec(cfg, task)
    model, tokenizer = make_model(cfg, spec, all_texts(splits.train + splits.val + splits.test))
    model.train()
    builder = SequenceBuilder(tokenizer, spec.replace(K=cfg.memory.K), task.join_steps)
    examples = splits.train[: cfg.train.batch_size]
    entries = []
    for stage in plan_stages(cfg, builder):
        batch = collate(
            [stage.layout(ex) for ex in examples], tokenizer.pad_token_id, spec.readout_sees_question
        )
        params = [p for p in model.parameters() if p.requires_grad]
        entries.append(
            {
                "method": method,
                "stage": stage.name,
                "steps": stage.steps,
                "model": model,
                "optimizer": torch.optim.AdamW(params, lr=stage.lr),
                "loss": stage.loss or _loss,
                "batch": batch,
                "weights": stage.weights(batch, 0.5),
                "passes": 1 + int((batch.roles == Role.THOUGHT).sum(1).max()),
                "tokens": int((batch.roles > 0).sum()),
                "times": [],
            }
        )
    return entries


def step(entry: dict) -> float:
    start = time.perf_counter()
    loss, _ = entry["loss"](entry["model"], entry["batch"], entry["weights"])
    loss.backward()
    entry["optimizer"].step()
    entry["optimizer"].zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.errors import RimLensError
    from rim_lens.methods import METHODS

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.repeat < 1:
        print(f"bench/train_step.py: unknown method(s) {unknown} or --repeat < 1", file=sys.stderr)
        return 2
    try:
        entries = [e for m in methods for e in prepare(args.recipe, args.overrides, m)]
    except RimLensError as err:
        print(f"bench/train_step.py: {err}", file=sys.stderr)
        return 2
    for e in entries:
        for _ in range(args.warmup):
            step(e)
    start = time.perf_counter()
    for i in range(args.repeat):
        order = entries[i % len(entries) :] + entries[: i % len(entries)]
        for e in order:
            e["times"].append(step(e))
    wall = time.perf_counter() - start

    stages = {
        f"{e['method']}:{e['stage']}": {
            "s_per_step": statistics.median(e["times"]),
            "forward_passes": e["passes"],
            "tokens": e["tokens"],
            "steps_in_run": e["steps"],
        }
        for e in entries
    }
    summary = {}
    for m in methods:
        mine = [e for e in entries if e["method"] == m]
        total = sum(e["steps"] for e in mine)
        summary[m] = {
            "s_per_step": sum(statistics.median(e["times"]) * e["steps"] for e in mine) / total,
            "forward_passes_per_step": sum(e["passes"] * e["steps"] for e in mine) / total,
            "run_s": sum(statistics.median(e["times"]) * e["steps"] for e in mine),
        }
    batch = entries[0]["batch"].roles.shape[0]
    print(
        f"Training step (loss, backward, AdamW) at batch {batch}, {args.threads} thread(s), "
        f"medians of {args.repeat} interleaved steps ({wall:.0f}s); recipe {Path(args.recipe).name}"
    )
    print(f"{'method:stage':<20} {'s/step':>8} {'passes':>7} {'tokens':>7} {'steps':>6}")
    for name, s in stages.items():
        print(
            f"{name:<20} {s['s_per_step']:>8.3f} {s['forward_passes']:>7} {s['tokens']:>7} "
            f"{s['steps_in_run']:>6}"
        )
    print(f"\n{'method':<10} {'s/step (run)':>13} {'passes/step':>12} {'run s':>8} {'vs rim':>7}")
    for m, s in summary.items():
        vs = s["s_per_step"] / summary["rim"]["s_per_step"] if "rim" in summary else float("nan")
        s["vs_rim"] = vs
        print(
            f"{m:<10} {s['s_per_step']:>13.3f} {s['forward_passes_per_step']:>12.2f} "
            f"{s['run_s']:>8.0f} {vs:>6.2f}x"
        )

    result = {
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "batch_size": batch,
        "threads": args.threads,
        "repeat": args.repeat,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": stages,
        "methods": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
