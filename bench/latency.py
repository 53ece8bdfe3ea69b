"""Inference cost of the demo runs side by side: time to first answer token, full-answer latency,
answer tokens and forward passes at batch 1 with a KV cache.

    python bench/latency.py [--runs runs/demo] [--n 50] [--threads 1]

Loads the runs `direct`, `cot`, `rim` (and `pause`, `coconut` if present) under --runs and measures
them on the same held-out examples (the questions common to every run's test split). Methods are
interleaved per example, in an order that rotates from one example to the next, so that machine
noise hits all of them alike. Timings come from `rim_lens.evaluation.measure_latency` (the same
definition as metrics.json: TTFT is the time at which the decoding step that produced the first
answer token finished, the prefill included; for CoT that is the first token after the answer
prefix); token and forward-pass counts come from `rim_lens.model.decoding.greedy_decode`. Medians are
reported, with the ratios to direct answering. The paper: RiM's TTFT equals direct's, CoT's is
about 9x on GSM8K with pretrained models. Coconut's prefill is one pass per continuous thought plus
one, and it writes the answer prefix itself; its latency and forward passes are also given against
RiM's (paper, Llama-3.2-1B: full-answer latency 304.7 / 126.5 ms = 2.4x).

Writes bench/results/latency.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("direct", "cot", "rim")
OPTIONAL = ("pause", "coconut")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency.json"


@dataclass
class Method:
    name: str
    path: Path
    lab: object  # rim_lens.Lab: model, tokenizer, spec, builder, task
    max_new_tokens: int
    examples: dict  # question -> Example


def is_run(path: Path) -> bool:
    from rim_lens import artefacts

    return all(
        p.exists()
        for p in (path / artefacts.MODEL / "config.json", artefacts.split_path(path), path / artefacts.CONFIG)
    )


def load_method(name: str, path: Path, max_new_tokens: int | None) -> Method:
    from rim_lens.analysis.lab import Lab
    from training.config import load_config

    lab = Lab.open(path, n=None)
    limit = max_new_tokens or load_config(path / "config.yaml").eval.max_new_tokens
    return Method(name, path, lab, limit, {ex.question: ex for ex in lab.examples})


def common_examples(methods: list[Method], n: int) -> list:
    """The first n held-out examples (in the first run's order) that every run holds."""
    first = methods[0]
    shared = [q for q in first.examples if all(q in m.examples for m in methods[1:])]
    return [first.examples[q] for q in shared[:n]]


def count(method: Method, ex) -> tuple[int, int, bool]:
    """(answer tokens, forward passes, correct) of one greedy answer at batch 1."""
    from rim_lens.evaluation import answer_text
    from rim_lens.model.decoding import greedy_decode

    lab = method.lab
    d = greedy_decode(
        lab.model,
        [lab.builder.prompt(ex)],
        eos_id=lab.tokenizer.eos_token_id,
        pad_id=lab.tokenizer.pad_token_id,
        max_new_tokens=method.max_new_tokens,
        sees_question=lab.spec.readout_sees_question,
    )
    ids = d.tokens[0]
    correct = lab.task.answers_match(answer_text(lab.tokenizer, ids, lab.spec), ex.answer)
    return len(ids), d.forward_passes, correct


def time_one(method: Method, ex) -> dict[str, float]:
    from rim_lens.evaluation import measure_latency

    lab = method.lab
    return measure_latency(
        lab.model, lab.tokenizer, lab.builder, [ex], max_new_tokens=method.max_new_tokens, warmup=0
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default="runs/demo", help="folder holding the demo runs (default: runs/demo)"
    )
    parser.add_argument("--n", type=int, default=50, help="held-out examples to time (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed examples per method first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="decoding limit (default: each run's eval.max_new_tokens)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    root = Path(args.runs)
    missing = [m for m in REQUIRED if not is_run(root / m)]
    if missing:
        print(
            f"bench/latency.py: no trained {', '.join(missing)} run(s) in {root}; run `make demo` first "
            f"(or pass --runs DIR)",
            file=sys.stderr,
        )
        return 2
    if args.n < 1:
        print("bench/latency.py: --n must be >= 1", file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    names = list(REQUIRED) + [m for m in OPTIONAL if is_run(root / m)]
    methods = [load_method(name, root / name, args.max_new_tokens) for name in names]
    examples = common_examples(methods, args.n)
    if not examples:
        print(
            f"bench/latency.py: the runs in {root} share no held-out question; train them on the same data",
            file=sys.stderr,
        )
        return 2

    for m in methods:  # untimed warm-up (allocator, kernels, caches)
        for ex in examples[: args.warmup]:
            time_one(m, ex)

    raw: dict[str, dict[str, list]] = {
        m.name: {k: [] for k in ("ttft_ms", "latency_ms", "answer_tokens", "forward_passes", "correct")}
        for m in methods
    }
    start = time.perf_counter()
    for i, ex in enumerate(examples):
        # Interleaved per example, the order rotating, so drift and noise hit every method alike.
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for m in order:
            timing = time_one(m, ex)
            raw[m.name]["ttft_ms"].append(timing["ttft_ms"])
            raw[m.name]["latency_ms"].append(timing["latency_ms"])
        for m in methods:  # deterministic counts, untimed
            tokens, passes, correct = count(m, ex)
            raw[m.name]["answer_tokens"].append(tokens)
            raw[m.name]["forward_passes"].append(passes)
            raw[m.name]["correct"].append(correct)
    wall = time.perf_counter() - start

    summary: dict[str, dict] = {}
    for m in methods:
        r = raw[m.name]
        summary[m.name] = {
            "K": m.lab.spec.K if m.lab.spec.uses_blocks else 0,
            "M": m.lab.spec.M if m.lab.spec.uses_blocks else 0,
            "thoughts": m.lab.spec.thoughts,
            "ttft_ms": statistics.median(r["ttft_ms"]),
            "latency_ms": statistics.median(r["latency_ms"]),
            "answer_tokens": statistics.median(r["answer_tokens"]),
            "answer_tokens_mean": statistics.fmean(r["answer_tokens"]),
            "forward_passes": statistics.median(r["forward_passes"]),
            "accuracy": sum(r["correct"]) / len(r["correct"]),
            "run": str(m.path),
        }
    base = summary["direct"]
    for s in summary.values():
        s["ttft_vs_direct"] = s["ttft_ms"] / base["ttft_ms"]
        s["latency_vs_direct"] = s["latency_ms"] / base["latency_ms"]

    task = methods[0].lab.task
    print(
        f"Latency at batch 1, KV cache, {len(examples)} held-out {task!r} examples, "
        f"{args.threads} thread(s), medians ({wall:.1f}s)"
    )
    header = (
        f"{'method':<8} {'K':>3} {'acc':>6} {'TTFT ms':>9} {'latency ms':>11} {'ans tok':>8} {'fwd':>5} "
        f"{'TTFT/direct':>12} {'lat/direct':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        print(
            f"{name:<8} {s['K']:>3} {s['accuracy']:>6.3f} {s['ttft_ms']:>9.2f} {s['latency_ms']:>11.2f} "
            f"{s['answer_tokens']:>8g} {s['forward_passes']:>5g} {s['ttft_vs_direct']:>11.2f}x "
            f"{s['latency_vs_direct']:>10.2f}x"
        )
    print("paper (Llama-3.2-1B, GSM8K): RiM TTFT = direct; CoT TTFT about 26x, full answer about 9x direct")
    if "coconut" in summary:
        c, r = summary["coconut"], summary["rim"]
        c["latency_vs_rim"] = c["latency_ms"] / r["latency_ms"]
        c["forward_passes_vs_rim"] = c["forward_passes"] / r["forward_passes"]
        print(
            f"coconut vs rim: latency {c['latency_vs_rim']:.2f}x, forward passes "
            f"{c['forward_passes_vs_rim']:.2f}x ({c['forward_passes']:g} / {r['forward_passes']:g}); "
            "paper (Llama-3.2-1B): latency 2.4x"
        )

    result = {
        "runs": str(root),
        "n": len(examples),
        "threads": args.threads,
        "warmup": args.warmup,
        "task": repr(task),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "examples": [ex.id for ex in examples],
        "methods": summary,
        "per_example": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
