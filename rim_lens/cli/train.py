"""`rim-lens train` and `rim-lens eval`."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe into runs/<name>/")
    p.add_argument("recipe", nargs="?", help="YAML recipe (see training/recipes/); defaults if omitted")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.steps=200 --set method=cot",
    )
    p.add_argument("--runs-dir", default="runs", help="parent folder of run directories (default: runs)")
    p.add_argument("--name", help="run name (default: the recipe's name, else recipe stem + method)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same name")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a trained run, optionally at other K / M (memory-budget sweep)")
    p.add_argument("run", help="run directory, e.g. runs/demo/rim")
    p.add_argument("--K", help="blocks at inference; a comma list sweeps (e.g. 1,2,4,8,16)")
    p.add_argument("--M", help="memory tokens per block; a comma list sweeps")
    p.add_argument("--n", type=int, help="evaluate on the first n held-out examples")
    p.add_argument("--data", help="evaluate on this data file instead of the run's held-out set")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    name = args.name or cfg.name or (f"{Path(args.recipe).stem}-{cfg.method}" if args.recipe else cfg.method)
    run = train(cfg, Path(args.runs_dir) / name, overwrite=args.overwrite)
    metrics = run.read_json("metrics.json")
    print(f"{run.path}: accuracy {metrics['accuracy']:.3f} on {metrics['n_eval']} held-out examples")
    return 0


def _ints(text: str | None, flag: str) -> list[int | None]:
    from rim_lens.errors import ConfigError

    if text is None:
        return [None]
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected integers separated by commas") from None


def _eval(args: argparse.Namespace) -> int:
    from rim_lens.data import read_examples
    from rim_lens.evaluation import evaluate
    from rim_lens.model.checkpoints import load_checkpoint
    from rim_lens.runs import open_run
    from training.config import load_config
    from training.trainer import write_results

    Ks, Ms = _ints(args.K, "--K"), _ints(args.M, "--M")
    run = open_run(args.run)
    model, tokenizer, spec = load_checkpoint(run.require("model"))
    cfg = load_config(run.require("config.yaml"))
    source = args.data or run.require("data/eval.jsonl")
    examples, _ = read_examples(source, spec.task, task_options=cfg.task.options)
    examples = examples[: args.n] if args.n else examples
    sweeping = args.K is not None or args.M is not None
    sweep = run.read_json("sweep.json") if run.exists("sweep.json") else []
    previous = run.read_json("metrics.json") if run.exists("metrics.json") else {}
    for K, M in itertools.product(Ks, Ms):
        metrics, predictions = evaluate(
            model,
            tokenizer,
            spec,
            examples,
            task_options=cfg.task.options,
            K=K,
            M=M,
            batch_size=cfg.eval.batch_size,
            latency_examples=cfg.eval.latency_examples,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        held_out = not args.data and not args.n
        if held_out and (metrics["K"], metrics["M"]) == (spec.K if spec.uses_blocks else 0, spec.M):
            # Re-evaluating the trained setting keeps what training recorded about itself.
            metrics.update(
                {k: previous[k] for k in ("train_time_s", "tokens_seen", "train_steps") if k in previous}
            )
            write_results(run, metrics, predictions)
        if sweeping or not held_out:
            stem = f"_{Path(args.data).stem}" if args.data else ""
            write_results(run, metrics, predictions, suffix=f"_K{metrics['K']}_M{metrics['M']}{stem}")
        if sweeping and not args.data:
            sweep = [s for s in sweep if (s["K"], s["M"]) != (metrics["K"], metrics["M"])] + [metrics]
        any_block = (
            f", any-block {metrics['any_block_accuracy']:.3f}" if "any_block_accuracy" in metrics else ""
        )
        print(
            f"K={metrics['K']} M={metrics['M']}: accuracy {metrics['accuracy']:.3f}{any_block} (n={metrics['n_eval']})"
        )
    if sweeping and not args.data:
        run.write_json("sweep.json", sorted(sweep, key=lambda s: (s["M"], s["K"])))
    return 0
