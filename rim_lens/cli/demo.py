"""`rim-lens demo`."""

from __future__ import annotations

import argparse

from rim_lens.cli.args import number, positive_int
from rim_lens.methods import DEMO_METHODS, method_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train RiM and its baselines (direct, CoT, pause, Coconut) on the default task, compare, report",
    )
    p.add_argument("--full", action="store_true", help="the longer budget (training/recipes/demo_full.yaml)")
    p.add_argument("--runs-dir", help="where the runs go (default: runs/demo, or runs/demo-full with --full)")
    p.add_argument(
        "--methods",
        default=",".join(DEMO_METHODS),
        help=f"comma-separated subset of {','.join(method_names())} (default: {','.join(DEMO_METHODS)})",
    )
    p.add_argument(
        "--recipe",
        help="compare on this recipe instead (e.g. training/recipes/gsm8k_lora.yaml; see make gsm8k)",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="training seeds per method (mean ± sd)")
    p.add_argument(
        "--seeds-for",
        action="append",
        default=[],
        metavar="METHOD=N",
        help="fewer seeds for one method, e.g. --seeds 5 --seeds-for coconut=1 (repeatable)",
    )
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="runs trained at a time (each with train.threads)"
    )
    p.add_argument(
        "--latency-examples",
        type=number(int, 0, name="count"),
        default=30,
        help="test questions timed side by side, interleaved, after training (0: skip)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the causal report on the RiM run")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain runs in --runs-dir that were trained with another recipe (never without it)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from rim_lens.errors import ConfigError
    from training.demo import run_demo

    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(method_names())})"
        )
    method_seeds = {}
    for item in args.seeds_for:
        method, _, count = item.partition("=")
        if method not in methods or not count.isdigit() or not 1 <= int(count) <= args.seeds:
            raise ConfigError(
                f"--seeds-for {item}: expected METHOD=N with METHOD one of --methods and 1 <= N <= --seeds"
            )
        method_seeds[method] = int(count)
    runs_dir = args.runs_dir or ("runs/demo-full" if args.full else "runs/demo")
    run_demo(
        runs_dir,
        full=args.full,
        methods=methods,
        report=not args.no_report,
        overrides=args.overrides,
        recipe=args.recipe,
        seeds=args.seeds,
        method_seeds=method_seeds,
        jobs=args.jobs,
        latency_examples=args.latency_examples,
        overwrite=args.overwrite,
    )
    return 0
