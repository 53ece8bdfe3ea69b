"""`rim-lens analyze NAME RUN`: one subcommand per declared analysis (`rim_lens.analysis.registry`),
whose options are derived from the analysis's signature. `rim-lens analyze NAME --help` lists
only that analysis's options, with an example; an option it does not take is an error."""

from __future__ import annotations

import argparse
import inspect
from typing import Any, NoReturn

from rim_lens.artefacts import SPLITS
from rim_lens.cli.args import Parser, number, positive_int
from training.config import SEEDS

DEFAULT_N = 200  # examples an analysis of a run reads by default
EXAMPLE_RUN = "runs/demo/rim"


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


class AnalysisParser(Parser):
    """One analysis's parser: an option it does not take is an error here, naming the analysis."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.not_taken(extra)
        return namespace, extra

    def not_taken(self, extra: list[str]) -> NoReturn:
        self.error(f"{self.prog} does not take {' '.join(extra)}")


def register(sub: argparse._SubParsersAction, full: bool = True) -> None:
    """Add `analyze`; with `full`, a subcommand per analysis (this loads the Lab, so `rim-lens`'s
    other commands skip it)."""
    p = sub.add_parser(
        "analyze",
        help="causal and representational analyses of a run's memory blocks",
        description="Results go to RUN/analysis/ as parquet tables, JSON summaries (with a record of "
        "what was done) and plotly figure specs. `rim-lens analyze NAME --help` lists NAME's options.",
    )
    if not full:
        return
    from rim_lens.analysis.registry import analyses

    each = p.add_subparsers(dest="what", required=True, metavar="ANALYSIS", parser_class=AnalysisParser)
    for declared in analyses().values():
        q = each.add_parser(
            declared.name,
            help=declared.summary,
            description=inspect.getdoc(declared.function),
            epilog=f"example: rim-lens analyze {declared.name} {EXAMPLE_RUN} {declared.example}".rstrip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        q.add_argument("run", help=f"run directory, e.g. {EXAMPLE_RUN}")
        if not declared.on_run:
            _session_options(q)
        for param in declared.parameters():
            _add_option(q, declared, param)
        q.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="load models whose checkpoints carry their own Python code; only for code you trust",
        )
        q.set_defaults(func=_analyze, analysis=declared)


def _session_options(q: argparse.ArgumentParser) -> None:
    """How the model and its examples are opened (`Lab.open`)."""
    from rim_lens.analysis.backends import BACKENDS

    q.add_argument("--backend", choices=BACKENDS, default="hf", help="hook backend (default: hf)")
    q.add_argument(
        "--n", type=positive_int, default=DEFAULT_N, help=f"examples to analyse (default: {DEFAULT_N})"
    )
    q.add_argument("--split", choices=SPLITS, default="test", help="the run's data split (default: test)")
    q.add_argument("--data", help="analyse the examples of this data file instead of the run's split")


# Checked numbers for the parameters that need more than "an integer".
_NUMBERS = {
    "n": positive_int,
    "seeds": positive_int,
    "seed": number(int, *SEEDS, name="seed"),
}


def _add_option(q: argparse.ArgumentParser, declared: Any, param: inspect.Parameter) -> None:
    """The command-line option of one parameter of an analysis."""
    from rim_lens.analysis.registry import COMMON_HELP, kind_of

    kind, default = kind_of(param), param.default
    flag = "--" + declared.flags.get(param.name, param.name).replace("_", "-")
    shown = declared.help.get(param.name) or COMMON_HELP.get(param.name) or f"(default: {default})"
    options: dict[str, Any] = {"dest": param.name, "default": default, "help": shown}
    if kind == "flag":
        options["action"] = argparse.BooleanOptionalAction
    elif kind == "ints":
        options.update(type=_int_list, default=[default] if isinstance(default, int) else default)
    elif kind == "int":
        options["type"] = _NUMBERS.get(param.name, number(int, name="integer"))
    elif kind == "float":
        options["type"] = number(float)
    else:
        options["choices"] = declared.choices.get(param.name)
    q.add_argument(flag, **options)


def _analyze(args: argparse.Namespace) -> int:
    from rim_lens.model.checkpoints import remote_code

    with remote_code(args.trust_remote_code):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    declared = args.analysis
    options = {p.name: getattr(args, p.name) for p in declared.parameters()} | dict(declared.cli)
    if declared.on_run:
        print(declared.show(declared.function(args.run, **options)))
        return 0

    import json

    import pandas as pd

    from rim_lens.analysis.lab import Lab
    from rim_lens.analysis.results import plain

    lab = Lab.open(args.run, backend=args.backend, n=args.n, split=args.split, data=args.data)
    result = declared.function(lab, **options)
    out = result.save(lab.out)
    with pd.option_context("display.max_rows", 60, "display.width", 160):
        shown = result.table.drop(columns=["readouts", "correct"], errors="ignore").round(3)
        print(shown.to_string(index=False))
    print(json.dumps(plain(result.summary), indent=1))
    print(f"results in {out}/")
    return 0
