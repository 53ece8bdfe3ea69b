"""Methods side by side: the comparison table of `rim-lens demo`, the dashboard and the notebooks,
and the one latency measurement that may be compared across runs (`latency_side_by_side`)."""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.runs import Run

# Latency figures a side-by-side measurement gives each run (comparison() takes them over).
LATENCY_KEYS = ("ttft_ms", "latency_ms")


def _decode_limit(run: Run) -> int:
    """The run's decoding limit: its recipe's `eval.max_new_tokens`, else the one training resolved
    from the data (metrics.json), else 64."""
    import yaml

    from rim_lens import artefacts

    config = yaml.safe_load(run.require(artefacts.CONFIG).read_text()) or {}
    limit = (config.get("eval") or {}).get("max_new_tokens")
    return limit or run.read_json(artefacts.METRICS).get("max_new_tokens") or 64


def _timed(ts: list) -> dict:
    """Medians and interquartile ranges of one run's timings, its mean answer tokens and passes."""

    def spread(values: list[float]) -> list[float]:
        return [float(q) for q in np.percentile(values, [25, 75])]

    ttft, latency = [t.ttft_ms for t in ts], [t.latency_ms for t in ts]
    return {
        "ttft_ms": statistics.median(ttft),
        "ttft_iqr_ms": spread(ttft),
        "latency_ms": statistics.median(latency),
        "latency_iqr_ms": spread(latency),
        "answer_tokens": statistics.fmean(len(t.tokens) for t in ts),
        "forward_passes": statistics.fmean(t.forward_passes for t in ts),
        "n": len(ts),
    }


def _shared_questions(labs: list, n: int) -> list[Example]:
    """The first `n` test examples of the first lab whose question every other lab holds too."""
    first, *others = labs
    held = [{ex.question for ex in lab.examples} for lab in others]
    return [ex for ex in first.examples if all(ex.question in h for h in held)][:n]


def _interleaved(
    answer: Callable, names: list[str], examples: list[Example], warmup: int, repeats: int
) -> dict:
    """Each run's timings (`answer(name, example)`), by name: the runs take turns on every example in
    an order rotated by the example and the repeat, after `warmup` untimed answers each; of an
    example's `repeats` tries, the fastest times count."""
    for i, ex in enumerate(examples[:warmup]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            answer(name, ex)
    timings: dict[str, list] = {name: [] for name in names}
    for i, ex in enumerate(examples):
        tries: dict[str, list] = {name: [] for name in names}
        for r in range(repeats):
            turn = (i + r) % len(names)
            for name in names[turn:] + names[:turn]:
                tries[name].append(answer(name, ex))
        for name, ts in tries.items():  # same tokens every try (greedy); the fastest times
            fastest = dict(ttft_ms=min(t.ttft_ms for t in ts), latency_ms=min(t.latency_ms for t in ts))
            timings[name].append(dataclasses.replace(ts[0], **fastest))
    return timings


def latency_side_by_side(
    runs: Mapping[str, str | Path],
    examples: Sequence[Example] | None = None,
    n: int = 30,
    warmup: int = 3,
    max_new_tokens: int | None = None,
    repeats: int = 3,
) -> dict:
    """Time to first answer token and full-answer latency of several runs in ONE measurement: at
    batch 1 with a KV cache (`evaluation.time_answer`), on the same examples, interleaved (for
    example i the runs take turns in an order rotated by i, so drift and other jobs' load hit
    them alike), after `warmup` untimed answers each. Each example is answered `repeats` times
    per run (the turns rotating again) and its fastest time counts: on a shared machine a
    preempted answer is slower by whatever else ran, never faster. Each run decodes as its method
    does (its prompt layout and `greedy_decode`'s path: plain causal, role-masked, or any other a
    method brings), up to `max_new_tokens` (default: its recipe's `eval.max_new_tokens`).

    `runs`: run directories by name, e.g. {"direct": "runs/demo/direct", "rim": ...}; `examples`
    default to the first `n` test questions every run holds. Returns {"runs": {name: {ttft_ms,
    latency_ms (medians), ttft_iqr_ms, latency_iqr_ms ([q1, q3]), answer_tokens and
    forward_passes (means), n}}, "examples": ids, "warmup", "repeats", "threads",
    "load_average"}. Absolute times depend on the machine and its load; ratios between runs of
    one measurement are what carry.
    """
    import torch

    from rim_lens.analysis.lab import Lab
    from rim_lens.evaluation import time_answer

    if not runs:
        raise RunError("latency_side_by_side: no runs given")
    labs = {name: Lab.open(path, n=None) for name, path in runs.items()}
    limits = {name: max_new_tokens or _decode_limit(lab.run) for name, lab in labs.items()}
    if examples is None:
        examples = _shared_questions(list(labs.values()), n)
    examples = list(examples)
    if not examples:
        raise RunError(f"latency_side_by_side: the runs {', '.join(runs)} share no test question")
    load_start = os.getloadavg()[0]

    def answer(name: str, ex: Example):
        lab = labs[name]
        return time_answer(lab.model, lab.tokenizer, lab.builder, ex, limits[name])

    timings = _interleaved(answer, list(labs), examples, warmup, repeats)
    return {
        "runs": {name: _timed(ts) | {"max_new_tokens": limits[name]} for name, ts in timings.items()},
        "examples": [ex.id for ex in examples],
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_average": [load_start, os.getloadavg()[0]],
    }


def comparison(metrics: Mapping[str, dict], latency: Mapping | None = None) -> list[dict]:
    """One row per run (metrics.json by name): accuracy with its 95% interval, any-block accuracy,
    answer tokens, forward passes, latency and its ratios to the run called `direct`. With
    `latency` (a `latency_side_by_side` result) the latency columns come from that one interleaved
    measurement; otherwise from each run's metrics.json (timed alone: not comparable across runs)."""
    if latency is not None:
        timed = latency["runs"]
        metrics = {
            name: {**m, **{k: timed.get(name, {}).get(k) for k in LATENCY_KEYS}}
            for name, m in metrics.items()
        }
    base = metrics.get("direct", {})
    rows = []
    for name, m in metrics.items():

        def ratio(key: str, m: dict = m) -> float | None:
            return m[key] / base[key] if base.get(key) and m.get(key) else None

        lo, hi = m.get("accuracy_ci") or (None, None)
        rows.append(
            {
                "method": name,
                "accuracy": m["accuracy"],
                "accuracy_lo": lo,
                "accuracy_hi": hi,
                "any_block_accuracy": m.get("any_block_accuracy"),
                "answer_tokens": m["answer_tokens_mean"],
                "forward_passes": m["forward_passes_mean"],
                "ttft_ms": m.get("ttft_ms"),
                "latency_ms": m.get("latency_ms"),
                "ttft_vs_direct": ratio("ttft_ms"),
                "latency_vs_direct": ratio("latency_ms"),
                "train_time_s": m.get("train_time_s"),
            }
        )
    return rows


COLUMNS = (
    ("method", "method", "s"),
    ("accuracy", "accuracy (final block)", ".3f"),
    ("any_block_accuracy", "any-block", ".3f"),
    ("answer_tokens", "answer tokens", ".1f"),
    ("forward_passes", "forward passes", ".1f"),
    ("ttft_ms", "TTFT ms", ".2f"),
    ("latency_ms", "latency ms", ".2f"),
    ("ttft_vs_direct", "TTFT / direct", ".2f"),
    ("latency_vs_direct", "latency / direct", ".2f"),
    ("train_time_s", "train s", ".0f"),
)


def render(rows: list[dict]) -> str:
    """The comparison as a Markdown table (accuracy with its 95% interval when known)."""

    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "–"
        text = format(value, spec)
        if key == "accuracy" and row.get("accuracy_lo") is not None:
            text += f" [{row['accuracy_lo']:.3f}, {row['accuracy_hi']:.3f}]"
        return text

    lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, key, spec) for key, _, spec in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
