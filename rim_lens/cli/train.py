"""`rim-lens train` and `rim-lens eval`."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

from rim_lens.cli.args import positive_int


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a completed run of the same name; the old run stays until the new one completes",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start an interrupted run over instead of resuming it from its last checkpoint",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval",
        help="re-score a trained run, or sweep the memory budget K / M",
        description="Without --K/--M/--n/--data: re-score the trained setting on the validation and test "
        "splits (metrics.json; how a run searched with eval.score_test off gets its test figures, "
        "once it is chosen). With --K or --M: accuracy at each budget on --split, written to sweep.json.",
    )
    p.add_argument("run", help="run directory, e.g. runs/demo/rim")
    p.add_argument("--K", help="blocks at inference; a comma list sweeps (e.g. 1,2,4,8,16)")
    p.add_argument("--M", help="memory tokens per block; a comma list sweeps")
    p.add_argument("--split", choices=("val", "test"), default="test", help="held-out split (default: test)")
    p.add_argument("--n", type=positive_int, help="evaluate on the first n examples of the split")
    p.add_argument("--data", help="evaluate on this data file instead of a split of the run")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load a model whose checkpoint carries its own Python code "
        "(trained with model.trust_remote_code); only for code you trust",
    )
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from rim_lens.errors import ConfigError, clip
    from rim_lens.runs import check_name
    from training.config import load_config
    from training.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    runs_dir = Path(args.runs_dir)
    if args.name is not None:
        name = check_name(args.name, "--name", runs_dir)
    else:
        name = cfg.name or (f"{Path(args.recipe).stem}-{cfg.method}" if args.recipe else cfg.method)
        check_name(name, "name (from the recipe's file name; give --name)", runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ConfigError(
            f"--runs-dir {clip(args.runs_dir)}: is a file; give a folder (it is made if missing)"
        )
    run = train(cfg, runs_dir / name, overwrite=args.overwrite, restart=args.restart)
    metrics = run.read_json("metrics.json")
    print(
        f"{run.path}: {metrics['scored_on']} accuracy {_interval(metrics, 'accuracy')} "
        f"on {metrics['n_eval']} held-out examples"
    )
    return 0


def _ints(text: str | None, flag: str, low: int) -> list[int | None]:
    """A comma list of integers >= `low` (the recipe's own bound for that memory key)."""
    from rim_lens.errors import ConfigError, clip

    if text is None:
        return [None]
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{flag} {clip(repr(text))}: expected integers separated by commas, e.g. 1,2,4"
        ) from None
    if min(values) < low:
        raise ConfigError(f"{flag} {clip(repr(text))}: every value must be >= {low}")
    return values


def _eval(args: argparse.Namespace) -> int:
    from rim_lens.model.checkpoints import remote_code
    from rim_lens.model.memory import MemorySpec
    from rim_lens.runs import RunLock, open_run

    bounds = {f.name: f.metadata.get("min", 0) for f in dataclasses.fields(MemorySpec)}
    Ks, Ms = _ints(args.K, "--K", bounds["K"]), _ints(args.M, "--M", bounds["M"])
    run = open_run(args.run)
    # One writer at a time: a second eval waits for this one, a training refuses (and is refused).
    lock = RunLock(run.path, "eval").acquire(wait_for=("eval",))
    try:
        with remote_code(args.trust_remote_code):
            return _evaluate(args, run, Ks, Ms)
    finally:
        lock.release()


def _evaluate(args: argparse.Namespace, run, Ks: list[int | None], Ms: list[int | None]) -> int:
    """`rim-lens eval` on an opened run, under its lock: results merged into what is there."""
    from rim_lens import artefacts
    from rim_lens.data import read_examples
    from rim_lens.data.tasks import get_task
    from rim_lens.errors import ConfigError
    from rim_lens.evaluation import evaluate
    from rim_lens.model.checkpoints import load_checkpoint
    from training.config import load_config
    from training.trainer import resolve_max_new_tokens, write_results

    model, tokenizer, spec = load_checkpoint(run.require(artefacts.MODEL))
    cfg = load_config(run.require(artefacts.CONFIG))
    if (args.K or args.M) and not spec.uses_blocks:
        raise ConfigError(f"--K/--M: {run.path} is a {spec.method} model, which has no memory blocks")

    def read(path) -> list:
        return read_examples(path, spec.task, task_options=cfg.task.options)[0]

    sweeping = args.K is not None or args.M is not None
    if not (sweeping or args.n or args.data):
        return _rescore(run, model, tokenizer, spec, cfg, read)

    examples = read(args.data or run.require(artefacts.split_file(args.split)))
    examples = examples[: args.n] if args.n else examples
    task = get_task(spec.task, **cfg.task.options)
    seen = [ex for s in ("train", "val") for ex in read(run.require(artefacts.split_file(s)))]
    max_new_tokens = resolve_max_new_tokens(cfg, tokenizer, spec, seen)
    _check_budgets(model, tokenizer, spec, task, examples, max_new_tokens, Ks, Ms)
    label = Path(args.data).stem if args.data else args.split
    swept = []
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
            latency_examples=0,
            max_new_tokens=max_new_tokens,
        )
        metrics["split"] = label
        write_results(run, metrics, {"test": predictions}, suffix=f"_K{metrics['K']}_M{metrics['M']}_{label}")
        swept.append(metrics)
        any_block = (
            f", any-block {metrics['any_block_accuracy']:.3f}" if "any_block_accuracy" in metrics else ""
        )
        print(
            f"K={metrics['K']} M={metrics['M']} ({label}): accuracy {_interval(metrics, 'accuracy')}"
            f"{any_block} (n={metrics['n_eval']})"
        )
    if sweeping and not args.data and not args.n:
        _merge_sweep(run, swept, label)
    return 0


def _rescore(run, model, tokenizer, spec, cfg, read) -> int:
    """The trained setting scored on both held-out splits, into metrics.json and the predictions."""
    from rim_lens import artefacts
    from rim_lens.data import Splits
    from training.trainer import score, write_results

    # A settings search trains with eval.score_test off; this is how the chosen run's test split
    # is scored, once.
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, score_test=True))
    splits = Splits(*(read(run.require(artefacts.split_file(s))) for s in ("train", "val", "test")))
    metrics, predictions = score(model, tokenizer, spec, splits, cfg)
    # What training measured (time, tokens, the input share of block states) stays.
    metrics = {**_previous(run, artefacts.METRICS, {}), **metrics}
    write_results(run, metrics, predictions)
    print(
        f"{run.path}: test accuracy {_interval(metrics, 'test_accuracy')}, "
        f"val {_interval(metrics, 'val_accuracy')}"
    )
    return 0


def _check_budgets(
    model, tokenizer, spec, task, examples: list, max_new_tokens: int, Ks: list, Ms: list
) -> None:
    """ConfigError, before anything is scored, if the model cannot take some budget's blocks, or
    some example's scored sequence or decoded answer under it."""
    from rim_lens.errors import ConfigError, clip
    from rim_lens.model.layouts import SequenceBuilder
    from training.trainer import longest, position_limit

    limit = position_limit(model)
    for K, M in itertools.product(Ks, Ms):
        budget = spec.replace(K=K or spec.K, M=spec.M if M is None else M)
        fix = f"--K/--M: with K={budget.K}, M={budget.M}"
        if limit and budget.K * (budget.M + 2) >= limit:  # before any sequence is built
            raise ConfigError(
                f"{fix} the blocks alone take {budget.K * (budget.M + 2):,} positions but the model takes "
                f"{limit}; use fewer blocks or memory tokens"
            )
        builder = SequenceBuilder(tokenizer, budget, task.join_steps)
        need, ex = longest(builder.scored, examples)
        prompt, decoded = longest(builder.prompt, examples)
        if prompt + max_new_tokens - 1 > need:  # decoding feeds up to max_new_tokens - 1 tokens back
            need, ex = prompt + max_new_tokens - 1, decoded
        if limit and need > limit:
            raise ConfigError(
                f"{fix} example {clip(ex.id, 40)} needs {need} positions (its answer included) "
                f"but the model takes {limit}; use fewer blocks or memory tokens"
            )


def _merge_sweep(run, swept: list[dict], label: str) -> None:
    """sweep.json with the budgets just swept on `label` replacing what it held for them."""
    from rim_lens import artefacts

    new = {(m["K"], m["M"], label) for m in swept}
    sweep = [s for s in _previous(run, artefacts.SWEEP, []) if _sweep_key(s) not in new] + swept
    run.write_json(artefacts.SWEEP, sorted(sweep, key=lambda s: (s.get("split", ""), s["M"], s["K"])))


def _sweep_key(entry: object) -> tuple:
    return (entry.get("K"), entry.get("M"), entry.get("split")) if isinstance(entry, dict) else ()


def _previous(run, name: str, empty):
    """What eval wrote before, to be updated; a corrupt file is replaced (eval is what writes it)."""
    import sys

    from rim_lens.errors import RunError

    if not run.exists(name):
        return empty
    try:
        found = run.read_json(name)
    except RunError as err:
        print(f"rim-lens: warning: {str(err).split(';')[0]}; writing it anew", file=sys.stderr)
        return empty
    if not isinstance(found, type(empty)):
        print(f"rim-lens: warning: {run.path / name}: not what eval writes; writing it anew", file=sys.stderr)
        return empty
    return found


def _interval(metrics: dict, key: str) -> str:
    lo, hi = metrics[f"{key}_ci"]
    return f"{metrics[key]:.3f} [{lo:.3f}, {hi:.3f}]"
