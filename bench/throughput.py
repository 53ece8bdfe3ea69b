"""Throughput where users wait: batched evaluation, block-state capture and training, per run.

    python bench/throughput.py [--runs runs/demo] [--n 500] [--train-steps 20]

- evaluation: greedy decoding of `--n` held-out examples in batches of 256 with a KV cache
  (`rim_lens.evaluation.decode_answers`, what `rim-lens eval` runs), examples and generated
  tokens per second, for every run among direct, cot, pause, rim (and coconut); the runs are timed
  interleaved, `--repeat` times, the fastest counting.
- capture: `Lab.capture` of the RiM run's `--n` examples (block states at every layer to
  safetensors shards, plus the readout after every block) and the same without readouts.
- training: `--train-steps` optimizer steps of each run's own recipe (its config.yaml) from
  scratch, with whatever batch sampler the trainer has: non-padding tokens per second as the
  trainer counts them (`tokens_seen / train_time_s`).

Writes bench/results/throughput.json. Absolute rates depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("direct", "cot", "pause", "rim", "coconut")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput.json"


def evaluation(labs: dict, n: int, repeat: int) -> dict:
    from rim_lens.evaluation import decode_answers

    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(repeat):
        for name, lab in labs.items():
            examples = lab.examples[:n]
            t = time.perf_counter()
            out = decode_answers(lab.model, lab.tokenizer, lab.builder, examples, batch_size=256)
            seconds = time.perf_counter() - t
            best[name] = min(best.get(name, seconds), seconds)
            tokens[name] = sum(r.tokens for r in out)
    return {
        name: {
            "examples": len(labs[name].examples[:n]),
            "seconds": s,
            "examples_per_s": len(labs[name].examples[:n]) / s,
            "generated_tokens_per_s": tokens[name] / s,
        }
        for name, s in best.items()
    }


def capture(lab, n: int) -> dict:
    from rim_lens.analysis.lab import Lab

    out = Path(tempfile.mkdtemp(prefix="rim-throughput-"))
    try:
        session = Lab.from_model(lab.model, lab.tokenizer, lab.spec, lab.examples[:n], task=lab.task, out=out)
        session.with_examples(lab.examples[:8]).capture(refresh=True)  # warm-up
        result = {"examples": len(session.examples)}
        for readouts in (True, False):
            t = time.perf_counter()
            session.capture(readouts=readouts, refresh=True)
            seconds = time.perf_counter() - t
            key = "with_readouts" if readouts else "states_only"
            result[key] = {"seconds": seconds, "examples_per_s": len(session.examples) / seconds}
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def training(run: Path, steps: int, threads: int) -> dict:
    from training.config import load_config
    from training.trainer import train

    cfg = load_config(
        run / "config.yaml",
        [
            f"train.steps={steps}",
            f"train.threads={threads}",
            f"train.eval_every={steps + 1}",  # no held-out check inside the timed steps
            "eval.n=8",
            "eval.score_test=false",
        ],
    )
    out = Path(tempfile.mkdtemp(prefix="rim-throughput-train-"))
    try:
        metrics = train(cfg, out / run.name, overwrite=True).read_json("metrics.json")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "tokens_seen": metrics["tokens_seen"],
        "seconds": metrics["train_time_s"],
        "tokens_per_s": metrics["tokens_seen"] / metrics["train_time_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default="runs/demo", help="folder holding the demo runs (default: runs/demo)"
    )
    parser.add_argument(
        "--n", type=int, default=500, help="held-out examples to decode and capture (default 500)"
    )
    parser.add_argument("--train-steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--repeat", type=int, default=2, help="evaluation repeats, interleaved (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more oversubscribe)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    root = Path(args.runs)
    names = [m for m in METHODS if (root / m / "model").is_dir() and (root / m / "config.yaml").exists()]
    if "rim" not in names:
        print(
            f"bench/throughput.py: no trained rim run in {root}; run `make demo` first (or pass --runs DIR)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.analysis.lab import Lab
    from rim_lens.fileio import atomic_write_json

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    threads = args.threads
    load_start = os.getloadavg()[0]
    labs = {name: Lab.open(root / name, n=args.n) for name in names}
    evaluation(labs, 16, 1)  # warm-up
    result = {
        "runs": str(root),
        "evaluation": evaluation(labs, args.n, args.repeat),
        "capture": capture(labs["rim"], args.n),
        "training": {name: training(root / name, args.train_steps, threads) for name in names},
    }
    torch.set_num_threads(threads)  # the trainer sets its own
    result.update(
        threads=threads,
        load_average_1min_start_end=[load_start, os.getloadavg()[0]],
        machine={
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    print(
        f"Throughput ({threads} threads, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}: a shared "
        "machine)"
    )
    print(f"{'run':<8} {'eval examples/s':>16} {'eval tokens/s':>14} {'train tokens/s':>15}")
    for name in names:
        e, t = result["evaluation"][name], result["training"][name]
        print(
            f"{name:<8} {e['examples_per_s']:>16.0f} {e['generated_tokens_per_s']:>14.0f} "
            f"{t['tokens_per_s']:>15.0f}"
        )
    c = result["capture"]
    print(
        f"capture of {c['examples']} rim examples: {c['with_readouts']['examples_per_s']:.0f} examples/s "
        "with readouts, "
        f"{c['states_only']['examples_per_s']:.0f} states only"
    )
    print(f"written {atomic_write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
