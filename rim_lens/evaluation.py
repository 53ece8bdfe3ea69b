"""Exact-match accuracy, per-block readouts, answer tokens, forward passes and latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rim_lens.data.examples import Example
from rim_lens.data.tasks import Task, get_task
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import SequenceBuilder
from rim_lens.model.memory import MemorySpec
from rim_lens.stats import proportion


@dataclass
class Readout:
    """What a model answered for one prompt, and how many tokens it generated for it."""

    text: str
    tokens: int


def answer_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], spec: MemorySpec) -> str:
    """The answer in generated ids: everything after the answer prefix for methods that write it
    (CoT, Coconut), else all."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if spec.trained_by.decodes_prefix:
        head, sep, tail = text.rpartition(spec.answer_prefix)
        return tail.strip() if sep else ""
    return text.strip()


def _with_interval(metrics: dict, key: str, flags: Seq[bool]) -> None:
    """metrics[key] = the fraction of true flags, metrics[key_ci] = its 95% Wilson interval."""
    estimate = proportion(flags)
    metrics[key], metrics[f"{key}_ci"] = estimate.value, [estimate.lo, estimate.hi]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    builder: SequenceBuilder,
    examples: Seq[Example],
    n_blocks: int | None = None,
    batch_size: int = 256,
    max_new_tokens: int = 64,
) -> list[Readout]:
    """Greedy answers for `examples`, reading out after `n_blocks` blocks (default K)."""
    out: list[Readout] = []
    for chunk in _chunks(list(examples), batch_size):
        decoded = greedy_decode(
            model,
            [builder.prompt(ex, n_blocks) for ex in chunk],
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            sees_question=builder.spec.readout_sees_question,
        )
        out += [Readout(answer_text(tokenizer, ids, builder.spec), len(ids)) for ids in decoded.tokens]
    return out


# Tokens decoding may run past the longest target it was derived from: room for a longer answer
# (or chain of thought) than any seen, never so much that a rambling model decodes for long.
DECODE_MARGIN = 16


def decode_budget(builder: SequenceBuilder, examples: Seq[Example]) -> int:
    """`max_new_tokens` derived from data: the most tokens any example's prompt must be followed
    by (`Method.emitted`: CoT's steps, answer prefix, answer and end of sequence; otherwise answer
    and end of sequence), plus DECODE_MARGIN. Derive it from training and validation examples,
    never the test set."""
    return max(builder.method.emitted(builder, ex) for ex in examples) + DECODE_MARGIN


def _first_answer_step(tokenizer: PreTrainedTokenizerBase, ids: list[int], spec: MemorySpec) -> int:
    """Index of the decoding step that produced the first answer token."""
    if not spec.trained_by.decodes_prefix:
        return 0
    prefix = tokenizer.encode(spec.answer_prefix, add_special_tokens=False)
    for i in range(len(ids) - len(prefix) + 1):
        if ids[i : i + len(prefix)] == prefix:
            return i + len(prefix)
    return max(len(ids), 0)


@dataclass
class Timing:
    """One greedy answer at batch 1: time to its first answer token and to its end (ms), its
    generated tokens (end of sequence excluded) and the model calls made."""

    ttft_ms: float
    latency_ms: float
    tokens: list[int]
    forward_passes: int


def time_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    builder: SequenceBuilder,
    example: Example,
    max_new_tokens: int = 64,
) -> Timing:
    """Decode one answer greedily at batch 1 with a KV cache, timed. TTFT is when the decoding step
    that produced the first answer token finished, the prefill included (for a method that writes
    the answer prefix itself, CoT and Coconut, the first token after it); latency is when the last
    step finished."""
    d = greedy_decode(
        model,
        [builder.prompt(example)],
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        sees_question=builder.spec.readout_sees_question,
    )
    first = min(_first_answer_step(tokenizer, d.tokens[0], builder.spec), len(d.step_times) - 1)
    return Timing(d.step_times[first] * 1e3, d.step_times[-1] * 1e3, d.tokens[0], d.forward_passes)


def measure_latency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    builder: SequenceBuilder,
    examples: Seq[Example],
    max_new_tokens: int = 64,
    warmup: int = 2,
) -> dict[str, float]:
    """Median time to first answer token and full-answer latency (ms) at batch 1, KV cache, of one
    model alone (several models side by side: `rim_lens.compare.latency_side_by_side`)."""
    warm = list(examples[:warmup])
    timings = [time_answer(model, tokenizer, builder, ex, max_new_tokens) for ex in warm + list(examples)]
    timings = timings[len(warm) :]
    if not timings:
        return {}
    return {
        "ttft_ms": statistics.median(t.ttft_ms for t in timings),
        "latency_ms": statistics.median(t.latency_ms for t in timings),
    }


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: MemorySpec,
    examples: Seq[Example],
    *,
    task_options: dict | None = None,
    K: int | None = None,
    M: int | None = None,
    batch_size: int = 256,
    latency_examples: int = 20,
    max_new_tokens: int = 64,
) -> tuple[dict, list[dict]]:
    """Metrics (the keys of metrics.json) and one prediction record per example.

    K and M may differ from what the model was trained with (the memory-budget sweep).
    """
    spec = spec.replace(K=K or spec.K, M=spec.M if M is None else M)
    task = get_task(spec.task or examples[0].task, **(task_options or {}))
    builder = SequenceBuilder(tokenizer, spec, task.join_steps)
    model.eval()

    start = time.perf_counter()
    final = decode_answers(model, tokenizer, builder, examples, None, batch_size, max_new_tokens)
    elapsed = time.perf_counter() - start
    correct = [task.answers_match(r.text, ex.answer) for r, ex in zip(final, examples)]

    n = len(examples)
    metrics: dict = {
        "method": spec.method,
        "task": task.name,
        "n_eval": n,
        "K": spec.K if spec.uses_blocks else 0,
        "M": spec.M,
        "thoughts": spec.thoughts if spec.uses_thoughts else 0,
    }
    _with_interval(metrics, "accuracy", correct)
    per_block: list[list[Readout]] = []
    if spec.uses_blocks:
        per_block = [
            decode_answers(model, tokenizer, builder, examples, k, batch_size, max_new_tokens)
            for k in range(1, spec.K)
        ]
        per_block.append(final)
        _block_accuracy(metrics, task, examples, per_block)
    metrics["chance_accuracy"] = task.chance_accuracy()
    metrics["answer_tokens_mean"] = sum(r.tokens for r in final) / n
    # One prefill, then one call per generated token after the first (the end token included);
    # Coconut's prefill is n + 1 passes, one per continuous thought (see rim_lens.model.coconut).
    metrics["forward_passes_mean"] = (
        sum(r.tokens + (1 if r.tokens < max_new_tokens else 0) for r in final) / n + metrics["thoughts"]
    )
    metrics["examples_per_s"] = n / elapsed
    metrics.update(
        measure_latency(model, tokenizer, builder, list(examples[:latency_examples]), max_new_tokens)
    )

    return metrics, _predictions(task, examples, final, correct, per_block)


def _block_accuracy(
    metrics: dict, task: Task, examples: Seq[Example], per_block: list[list[Readout]]
) -> None:
    """Add to `metrics` the accuracy of the answer read after each block, and of reading any block,
    with 95% intervals."""
    block_correct = [
        [task.answers_match(r.text, ex.answer) for r, ex in zip(rs, examples)] for rs in per_block
    ]
    block_estimates = [proportion(c) for c in block_correct]
    metrics["per_block_accuracy"] = [e.value for e in block_estimates]
    metrics["per_block_accuracy_ci"] = [[e.lo, e.hi] for e in block_estimates]
    _with_interval(metrics, "any_block_accuracy", [any(col) for col in zip(*block_correct)])


def _predictions(
    task: Task,
    examples: Seq[Example],
    final: list[Readout],
    correct: list[bool],
    per_block: list[list[Readout]],
) -> list[dict]:
    """One prediction record per example: its answer and, read out after each block, every block's."""
    predictions = []
    for i, (ex, r, ok) in enumerate(zip(examples, final, correct)):
        record = {
            "id": ex.id,
            "question": ex.question,
            "answer": ex.answer,
            "prediction": r.text,
            "correct": ok,
            "answer_tokens": r.tokens,
        }
        if per_block:
            record["per_block"] = [rs[i].text for rs in per_block]
            record["per_block_correct"] = [task.answers_match(rs[i].text, ex.answer) for rs in per_block]
        predictions.append(record)
    return predictions
