"""`rim-lens analyze WHAT RUN`: capture, pca, probe, lens, ablate, knockout, patch, interchange, report."""

from __future__ import annotations

import argparse

WHATS = ("capture", "pca", "probe", "lens", "ablate", "knockout", "patch", "interchange", "report")


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
        description="Results go to RUN/analysis/ as parquet tables, JSON summaries and plotly figure specs.",
    )
    p.add_argument("what", choices=WHATS)
    p.add_argument("run", help="run directory, e.g. runs/demo/rim")
    p.add_argument(
        "--backend", choices=("hf", "tl", "nnsight"), default="hf", help="hook backend (default: hf)"
    )
    p.add_argument("--n", type=int, default=200, help="held-out examples to analyse (default: 200)")
    p.add_argument("--data", help="analyse the examples of this data file instead of the run's held-out set")
    p.add_argument("--layers", type=_int_list, default=None, help="layers, e.g. 0,2-3 (default: all)")
    p.add_argument("--blocks", type=_int_list, default=None, help="blocks (1-based), e.g. 1-4 (default: all)")
    p.add_argument("--slots", type=_int_list, default=None, help="slots in a block, 0..M+1 (default: all)")
    p.add_argument(
        "--mode", choices=("zero", "mean", "resample"), default="mean", help="ablation (default: mean)"
    )
    p.add_argument("--grid", action="store_true", help="ablate: also every single (layer, block)")
    p.add_argument("--per-slot", action="store_true", help="patch: one cell per (layer, block, slot)")
    p.add_argument("--attn", action="store_true", help="capture: also attention outputs")
    p.add_argument("--control", help="report: control run (default: the sibling 'pause' run)")
    p.add_argument("--direct", help="report: direct-answer run for the baseline (default: sibling 'direct')")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    if args.what == "report":
        from rim_lens.analysis.report import build_report

        report = build_report(
            args.run, control=args.control, direct=args.direct, backend=args.backend, n=args.n, seed=args.seed
        )
        print(report["verdict"])
        return 0

    import json

    import pandas as pd

    from rim_lens.analysis import analyses
    from rim_lens.analysis.lab import Lab

    lab = Lab.open(args.run, backend=args.backend, n=args.n, data=args.data)
    table, summary = getattr(analyses, f"run_{args.what}")(lab, **vars(args))
    with pd.option_context("display.max_rows", 60, "display.width", 160):
        print(table.round(3).to_string(index=False))
    print(json.dumps(summary, indent=1))
    print(f"results in {lab.out}/")
    return 0
