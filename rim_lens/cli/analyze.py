"""`rim-lens analyze WHAT RUN`: the analyses of `rim_lens.artefacts.ANALYSES`, each a `Lab` method."""

from __future__ import annotations

import argparse

from rim_lens.analysis.verdict import CALIBRATION_SEEDS
from rim_lens.artefacts import ANALYSES, PATCH_METHODS, SPLITS
from rim_lens.cli.args import number, positive_int
from training.config import SEEDS

WHATS = tuple(ANALYSES)


def _int_list(text: str) -> list[int] | None:
    """`all` or comma-separated integers (ranges like 1-4 allowed)."""
    if text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or integers like 0,2-4, got {text!r}") from None
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="causal and representational analyses of a run's memory blocks",
        description="Results go to RUN/analysis/ as parquet tables, JSON summaries (with a record of "
        "what was done) and plotly figure specs.",
    )
    p.add_argument("what", choices=WHATS)
    p.add_argument("run", help="run directory, e.g. runs/demo/rim")
    p.add_argument(
        "--backend", choices=("hf", "tl", "nnsight"), default="hf", help="hook backend (default: hf)"
    )
    p.add_argument("--n", type=positive_int, default=200, help="examples to analyse (default: 200)")
    p.add_argument("--split", choices=SPLITS, default="test", help="the run's data split (default: test)")
    p.add_argument("--data", help="analyse the examples of this data file instead of the run's split")
    p.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        help="layers, e.g. 0,2-3 (default: all; report: the layers of its per-layer grids)",
    )
    p.add_argument("--blocks", type=_int_list, default=None, help="blocks (1-based), e.g. 1-4 (default: all)")
    p.add_argument("--slots", type=_int_list, default=None, help="slots in a block, 0..M+1 (default: all)")
    p.add_argument(
        "--mode", choices=("zero", "mean", "resample"), default="mean", help="ablation (default: mean)"
    )
    p.add_argument("--grid", action="store_true", help="ablate: also every single (layer, block)")
    p.add_argument("--per-slot", action="store_true", help="patch: one cell per (layer, block, slot)")
    p.add_argument(
        "--method",
        choices=PATCH_METHODS,
        default=None,
        help="patch: exact (skips unchanged work; hf backend, the default there), full (the same numbers, "
        "whole passes; the default on tl and nnsight), attribution (gradient estimate of every cell and "
        "block-to-block edges, from two forward passes and one backward; writes patch_attribution.*)",
    )
    p.add_argument("--attn", action="store_true", help="capture: also attention outputs")
    p.add_argument("--variable", help="abstraction: one variable, e.g. step1 (default: every one)")
    p.add_argument(
        "--basis",
        choices=("das", "probe", "random"),
        default="das",
        help="abstraction: the subspace to interchange along (default: das, with the probe map)",
    )
    p.add_argument(
        "--rank", type=_int_list, default=[1], help="abstraction: subspace rank(s), e.g. 1,2 (default: 1)"
    )
    p.add_argument(
        "--joint",
        action="store_true",
        help="abstraction: also fit DAS over every slot of several blocks at once (as the report does)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=CALIBRATION_SEEDS,
        help=f"calibrate: planted seeds (default: {CALIBRATION_SEEDS}); each finding's detection and "
        "false-positive rate",
    )
    p.add_argument("--control", help="report: control run (default: the sibling 'pause' run)")
    p.add_argument("--direct", help="report: direct-answer run for the baseline (default: sibling 'direct')")
    p.add_argument("--seed", type=number(int, *SEEDS, name="seed"), default=0)
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load models whose checkpoints carry their own Python code; only for code you trust",
    )
    p.set_defaults(func=_analyze)


def _options(args: argparse.Namespace) -> dict:
    """The Lab method's arguments for `args.what`."""
    where = dict(layers=args.layers, blocks=args.blocks, slots=args.slots)
    return {
        "capture": dict(layers=args.layers, attn=args.attn, refresh=True),
        "pca": where,
        "probe": {**where, "seed": args.seed},
        "lens": where,
        "ablate": {**where, "mode": args.mode, "grid": args.grid, "seed": args.seed},
        "knockout": where,
        "patch": {**where, "per_slot": args.per_slot, "seed": args.seed, "method": args.method},
        "interchange": {**where, "seed": args.seed},
        "abstraction": {
            **where,
            "variable": args.variable,
            "method": args.basis,
            "rank": args.rank or [1],
            "seed": args.seed,
            "joint": args.joint,
        },
    }[args.what]


def _analyze(args: argparse.Namespace) -> int:
    from rim_lens.model.checkpoints import remote_code

    with remote_code(args.trust_remote_code):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.what == "calibrate":
        from rim_lens.analysis.calibration import calibrate

        found = calibrate(args.run, n=args.n, seeds=args.seeds, split=args.split, seed=args.seed)
        print(f"each finding's test on planted models at n = {found['n']} ({found['seeds']} seeds):")
        for name, f in found["findings"].items():
            print(f"  {name}: detection {f['detection']:.2f}, false positive {f['false_positive']:.2f}")
            for part, p in f["parts"].items():
                print(f"    {part}: detection {p['detection']:.2f}, false positive {p['false_positive']:.2f}")
        print(f"written to {args.run}/analysis/calibration.json ({found['seconds']:.0f} s)")
        return 0
    if args.what == "report":
        from rim_lens.analysis.report import build_report

        report = build_report(
            args.run,
            control=args.control,
            direct=args.direct,
            backend=args.backend,
            n=args.n,
            seed=args.seed,
            split=args.split,
            layers=args.layers,
        )
        print(report["verdict"])
        return 0

    import json

    import pandas as pd

    from rim_lens.analysis.lab import Lab
    from rim_lens.analysis.results import plain

    lab = Lab.open(args.run, backend=args.backend, n=args.n, split=args.split, data=args.data)
    result = getattr(lab, args.what)(**_options(args))
    out = result.save(lab.out)
    with pd.option_context("display.max_rows", 60, "display.width", 160):
        print(
            result.table.drop(columns=["readouts", "correct"], errors="ignore")
            .round(3)
            .to_string(index=False)
        )
    print(json.dumps(plain(result.summary), indent=1))
    print(f"results in {out}/")
    return 0
