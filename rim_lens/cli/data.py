"""`rim-lens data`: generate synthetic data sets and validate data files."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rim_lens.cli.args import number, positive_int
from rim_lens.data import read_examples, write_examples
from rim_lens.data.formats import format_lines
from rim_lens.data.tasks import TASK_NAMES, SyntheticTask, get_task
from rim_lens.errors import DataError, clip, size_text
from training.config import SEEDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="generate or validate data files")
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    generate = actions.add_parser("generate", help="write a synthetic data set (mult, modchain)")
    generate.add_argument("task", metavar="TASK", help=f"one of: {', '.join(TASK_NAMES)}")
    generate.add_argument("--n", type=positive_int, required=True, help="number of examples")
    generate.add_argument(
        "--seed", type=number(int, *SEEDS, name="seed"), default=0, help="random seed (default 0)"
    )
    generate.add_argument("--out", required=True, help="output file, .txt (iCoT lines) or .jsonl")
    generate.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILE",
        help="never generate a question of this data file (repeatable)",
    )
    _add_option_argument(generate)
    generate.set_defaults(func=_generate)

    validate = actions.add_parser("validate", help="check that every line of a data file parses")
    validate.add_argument("file", help=".txt (iCoT lines), .jsonl (examples) or .json (ProsQA)")
    validate.add_argument("--task", help="task of a .txt file (default: guessed from its first line)")
    validate.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip and count invalid lines instead of stopping at the first",
    )
    _add_option_argument(validate)
    validate.set_defaults(func=_validate)


def _add_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="task option, e.g. n=3 or length=4 (repeatable)",
    )


def _key_value(text: str) -> tuple[str, int | str]:
    key, eq, value = text.partition("=")
    if not (key and eq and value):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {clip(repr(text))}")
    try:
        return key, int(value)
    except ValueError:
        return key, value


def _generate(args: argparse.Namespace) -> None:
    task = get_task(args.task, **dict(args.option))
    if Path(args.out).is_dir():
        raise DataError(f"--out {clip(args.out)}: is a directory; give a file name ending in .txt or .jsonl")
    if Path(args.out).suffix not in (".txt", ".jsonl"):
        raise DataError(
            f"--out {clip(args.out)}: cannot write {clip(Path(args.out).suffix)!r} files; use .txt or .jsonl"
        )
    exclude = {ex.question for path in args.exclude for ex in read_examples(path)[0]}
    if isinstance(task, SyntheticTask):  # the others say they cannot generate
        task.check_count(args.n)
        _check_disk(task, args.n, args.seed, Path(args.out))
    examples = task.generate(args.n, args.seed, exclude, progress=True)
    write_examples(args.out, examples)
    excluded = f", avoiding {len(exclude)} questions" if args.exclude else ""
    print(f"wrote {len(examples)} {task!r} examples (seed {args.seed}{excluded}) to {args.out}")


def _check_disk(task: SyntheticTask, n: int, seed: int, out: Path) -> None:
    """DataError, before generating, if `n` examples would not fit on the disk of `out`
    (estimated from the lines of a small sample; the task's own check covers memory)."""
    sample = task.generate(min(n, 16), seed)
    need = n * sum(len(line.encode()) + 1 for line in format_lines(out, sample)) // len(sample)
    folder = out.absolute().parent
    while not folder.is_dir():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(
            f"--n {n:,}: the file would take about {size_text(need)}, more than the {size_text(free)} free "
            f"on the disk of {clip(str(folder))}; generate fewer examples or write elsewhere"
        )


def _validate(args: argparse.Namespace) -> None:
    examples, skipped = read_examples(
        args.file, args.task, skip_invalid=args.skip_invalid, task_options=dict(args.option) or None
    )
    tasks = ", ".join(sorted({ex.task for ex in examples})) or "none"
    report = f"{args.file}: {len(examples)} examples, task {tasks}"
    if args.skip_invalid:
        report += f", {skipped} invalid skipped"
    print(report)
