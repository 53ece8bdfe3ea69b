"""The training loop, top to bottom: data, model, stages, checkpoint, evaluation.

RiM trains in two stages (grounding, then refinement) with the optimizer and LR schedule reset
at the switch; the baselines (direct, cot, pause) run one stage with the same trainer, data and
step budget. The loop runs unchanged on one process or under `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import extract_model_from_parallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from rim_lens.artefacts import SPLITS, split_file
from rim_lens.data import Example, Splits, make_splits, read_examples, write_examples
from rim_lens.data.tasks import Task, get_task
from rim_lens.errors import ConfigError, RunError
from rim_lens.evaluation import decode_budget, evaluate
from rim_lens.fileio import atomic_write_text
from rim_lens.methods import Method
from rim_lens.model.checkpoints import build_model, load_pretrained, save_checkpoint, set_dropout
from rim_lens.model.layouts import IGNORE, Batch, Layout, SequenceBuilder, collate
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer, memory_token_ids
from rim_lens.runs import Run
from training.config import RunConfig
from training.sampling import LengthBuckets
from training.schedules import grounding_weights, refinement_weights

# train.precision -> accelerate's mixed_precision: autocast in bf16 / fp16, weights kept in fp32.
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Stage:
    """One optimisation phase: its layout of examples, loss weights, steps, LR and dropout."""

    name: str
    steps: int
    lr: float
    dropout: float
    layout: Callable[[Example], Layout]
    weights: Callable[[Batch, float], torch.Tensor]  # (batch, progress in [0, 1]) -> [B, S]


def plan_stages(cfg: RunConfig, builder: SequenceBuilder) -> list[Stage]:
    """RiM: grounding then refinement; pause: refinement only; direct and CoT: one stage."""
    t = cfg.train
    refine = lambda b, s: refinement_weights(b.target_index, cfg.memory.K, t.alpha)  # noqa: E731
    plain = lambda b, s: (b.target_index > 0).float()  # noqa: E731
    if cfg.method == "rim":
        stage1 = round(t.steps * t.stage1_fraction)
        ground = lambda b, s: grounding_weights(b.target_index, b.n_steps, s, t.lambda_hold)  # noqa: E731
        stages = [
            Stage("grounding", stage1, t.lr, t.dropout, builder.grounding, ground),
            Stage("refinement", t.steps - stage1, t.stage2_lr, t.stage2_dropout, builder.refinement, refine),
        ]
        return [s for s in stages if s.steps > 0]
    if cfg.method == "pause":
        return [Stage("refinement", t.steps, t.lr, t.dropout, builder.refinement, refine)]
    layout = builder.direct if cfg.method == "direct" else builder.cot
    return [Stage("train", t.steps, t.lr, t.dropout, layout, plain)]


# -- data and model ------------------------------------------------------------------------------
def load_data(cfg: RunConfig, task: Task) -> Splits:
    """Train, validation and test sets, disjoint by the task's canonical question key."""
    d = cfg.data

    def read(path: str) -> list[Example]:
        examples, skipped = read_examples(
            path, task.name, skip_invalid=d.skip_invalid, task_options=task.options
        )
        if skipped:
            print(f"{path}: skipped {skipped} invalid lines")
        return examples

    splits = make_splits(task, d.train, d.val, d.test, d.seed, read)
    if splits.dropped_from_train:
        print(f"data: dropped {splits.dropped_from_train} training examples whose question is held out")
    return splits


def make_model(cfg: RunConfig, spec: MemorySpec, texts: list[str]):
    """(model, tokenizer): from scratch with a word-level tokenizer, or a pretrained LM (+LoRA)."""
    m = cfg.model
    if m.pretrained is None:
        tokenizer = build_word_tokenizer(texts, spec)
        model = build_model(tokenizer, m.arch, m.preset, m.max_positions, cfg.train.dropout, cfg.seed)
    else:
        model, tokenizer = load_pretrained(m.pretrained, spec, trust_remote_code=m.trust_remote_code)
        if m.lora is not None:
            model = _with_lora(model, m.lora, memory_token_ids(tokenizer, spec))
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing is correct with frozen inputs (LoRA) and without use_cache.
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model, tokenizer


def _with_lora(model, options: dict, memory_ids: tuple[int, ...]):
    """`model` wrapped by PEFT LoRA; among the embeddings only the memory tokens' are trained."""
    from peft import LoraConfig, get_peft_model

    lora = {"target_modules": "all-linear", **options}
    try:
        config = LoraConfig(task_type="CAUSAL_LM", trainable_token_indices=list(memory_ids), **lora)
    except TypeError as err:
        raise ConfigError(f"model.lora: {err}") from None
    return get_peft_model(model, config)


def all_texts(examples: list[Example]) -> list[str]:
    return [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]


# -- loss and monitoring ------------------------------------------------------------------------
def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module mapping hidden states to logits (`lm_head`), through accelerate's and PEFT's
    wrappers."""
    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model.get_output_embeddings()


def target_logits(model, batch: Batch) -> torch.Tensor:
    """Logits [N, V] at the N target positions of `batch` (row-major order).

    Only target positions need logits, and full-vocabulary logits at every position are most of
    a pretrained model's memory. A pre-hook on the output layer gathers the target positions'
    hidden states, so the output layer sees [1, N, d]. The model is still called as a whole, so
    accelerate's autocast (mixed precision) and DDP gradient sync keep applying.
    """
    index = (batch.targets != IGNORE).flatten().nonzero().squeeze(1)

    def gather(module, args):
        return (args[0].flatten(0, 1)[index][None], *args[1:])

    handle = output_layer(model).register_forward_pre_hook(gather)
    try:
        return model(**batch.model_inputs(), use_cache=False).logits[0]
    finally:
        handle.remove()


def _loss(model, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the target positions, weighted by `weights` [B, S] (zero off targets)."""
    is_target = batch.targets != IGNORE
    ce = F.cross_entropy(target_logits(model, batch).float(), batch.targets[is_target], reduction="none")
    # Normalised by the weights in the batch: as lambda falls, the answer term keeps its scale.
    return (ce * weights[is_target]).sum() / weights.sum().clamp_min(1e-8)


def predicted_tokens(model, batch: Batch) -> torch.Tensor:
    """Greedy next tokens [B, S] at the target positions (teacher-forced), IGNORE elsewhere."""
    predicted = torch.full_like(batch.targets, IGNORE)
    predicted[batch.targets != IGNORE] = target_logits(model, batch).argmax(-1)
    return predicted


def readout_hits(predicted: torch.Tensor, batch: Batch, stage: str) -> dict[str, list[bool]]:
    """Per readout, whether each row that has it got all its tokens right (teacher-forced):
    step_t / answer in grounding, block_k in refinement, answer otherwise."""
    wrong = (predicted != batch.targets) & (batch.target_index > 0)
    out: dict[str, list[bool]] = {}
    for t in range(1, int(batch.target_index.max()) + 1):
        present = (batch.target_index == t).any(1)
        ok = ~(wrong & (batch.target_index == t)).any(1)
        if stage == "grounding":
            named = (("answer", batch.n_steps + 1 == t), (f"step_{t}", batch.n_steps >= t))
        else:
            named = ((f"block_{t}" if stage == "refinement" else "answer", torch.ones_like(present)),)
        for name, rows in named:
            rows = rows & present
            if rows.any():
                out.setdefault(name, []).extend(ok[rows].tolist())
    return out


def _readout_order(name: str) -> tuple[int, int]:
    kind, _, t = name.partition("_")
    return ({"step": 0, "answer": 1, "block": 2}[kind], int(t or 0))


@torch.no_grad()
def held_out_accuracy(
    model, layouts: list[Layout], stage: str, collate_fn: Callable[[list[Layout]], Batch], device, chunk: int
) -> dict[str, float]:
    """Teacher-forced readout accuracy (see `readout_hits`) over `layouts`, `chunk` sequences per
    forward pass, taken in order of length so that chunks carry little padding."""
    training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    by_length = sorted(layouts, key=len)
    for start in range(0, len(by_length), chunk):
        batch = collate_fn(by_length[start : start + chunk]).to(device)
        for name, ok in readout_hits(predicted_tokens(model, batch), batch, stage).items():
            hits.setdefault(name, []).extend(ok)
    model.train(training)
    return {name: sum(hits[name]) / len(hits[name]) for name in sorted(hits, key=_readout_order)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- the loop ------------------------------------------------------------------------------------
def run_stage(
    stage: Stage,
    model,
    train_set: list[Example],
    monitor: list[Example],
    cfg: RunConfig,
    accelerator: Accelerator,
    run: Run,
    pad_id: int,
    sees_question: bool,
) -> dict[str, float]:
    """Train one stage with a fresh optimizer and LR schedule; returns the final monitor accuracy."""
    t = cfg.train
    set_dropout(model, stage.dropout)
    batches = partial(collate, pad_id=pad_id, sees_question=sees_question)
    layouts = [stage.layout(ex) for ex in train_set]
    drop_last = len(train_set) >= t.batch_size
    if t.length_bucketing:
        sampler = LengthBuckets([len(x) for x in layouts], t.batch_size, seed=cfg.seed, drop_last=drop_last)
        loader = DataLoader(layouts, batch_sampler=sampler, collate_fn=batches)
    else:
        loader = DataLoader(
            layouts,
            batch_size=t.batch_size,
            shuffle=True,
            drop_last=drop_last,
            collate_fn=batches,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    monitor_layouts = [stage.layout(ex) for ex in monitor]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=t.weight_decay)
    warmup = int(t.warmup * stage.steps)
    make_schedule = (
        get_cosine_schedule_with_warmup if t.lr_schedule == "cosine" else get_constant_schedule_with_warmup
    )
    kwargs = {"num_training_steps": stage.steps} if t.lr_schedule == "cosine" else {}
    scheduler = make_schedule(optimizer, num_warmup_steps=warmup, **kwargs)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)

    def monitor_now(step: int) -> dict[str, float]:
        acc = held_out_accuracy(
            model, monitor_layouts, stage.name, batches, accelerator.device, cfg.eval.batch_size
        )
        if accelerator.is_main_process:
            run.log({"stage": stage.name, "step": step, "readout_accuracy": acc})
        return acc

    model.train()
    # `disable` is left to tqdm on the main process, so TQDM_DISABLE=1 silences the bar.
    quiet = {} if accelerator.is_main_process else {"disable": True}
    bar = tqdm(total=stage.steps, desc=f"{cfg.method}:{stage.name}", dynamic_ncols=True, **quiet)
    start, tokens, step, acc = time.perf_counter(), 0, 0, {}
    while step < stage.steps:
        for batch in loader:
            weights = stage.weights(batch, step / stage.steps)
            loss = _loss(model, batch, weights)
            accelerator.backward(loss)
            if t.grad_clip:
                accelerator.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int((batch.roles > 0).sum()) * accelerator.num_processes
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if accelerator.is_main_process and (step % t.log_every == 0 or step == stage.steps):
                run.log(
                    {
                        "stage": stage.name,
                        "step": step,
                        "loss": loss.item(),
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": time.perf_counter() - start,
                        "tokens_seen": tokens,
                    }
                )
            if step % t.eval_every == 0 or step == stage.steps:
                acc = monitor_now(step)
                bar.set_postfix(
                    loss=f"{loss.item():.4f}", **{k: f"{v:.2f}" for k, v in list(acc.items())[:4]}
                )
            if step >= stage.steps:
                break
    bar.close()
    if accelerator.is_main_process:
        shown = "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        print(
            f"[{cfg.method}] {stage.name}: {step} steps in {time.perf_counter() - start:.0f}s; held-out readout accuracy: {shown}"
        )
    return {"time_s": time.perf_counter() - start, "tokens_seen": tokens, "readout_accuracy": acc}


def train(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False) -> Run:
    """Train `cfg` into `run_dir`, save the checkpoint, evaluate; the run is marked failed on error.

    A directory that already holds a trained model is refused unless `overwrite`, so a new
    run never mixes its config and log with an older model.
    """
    run = Run(run_dir)
    if run.exists("model") and not overwrite:
        raise RunError(f"{run.path} already holds a trained run; choose another --name or pass --overwrite")
    accelerator = make_accelerator(cfg.train.precision)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "train_log.jsonl").unlink(missing_ok=True)
        (run.path / "config.yaml").write_text(cfg.to_yaml())
        run.mark("running", method=cfg.method)
    try:
        summary = _train(cfg, run, accelerator)
    except BaseException as err:
        if accelerator.is_main_process:
            run.mark("failed", method=cfg.method, error=f"{type(err).__name__}: {err}")
        raise
    if accelerator.is_main_process:
        run.mark("completed", method=cfg.method, **summary)
    # Other processes return only once the main one has saved and evaluated.
    accelerator.wait_for_everyone()
    return run


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator computing in `precision` (fp32, or bf16 / fp16 autocast over fp32 weights)."""
    mixed = PRECISIONS[precision]
    state = PartialState()
    if mixed == "fp16" and state.device.type == "cpu":
        raise ConfigError("train.precision: fp16 needs a GPU; on a CPU use bf16 or fp32")
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed and state.num_processes == 1:
        # accelerate keeps its state for the whole process and refuses a new precision; one
        # process may train several runs in turn (tests, notebooks), each with its own.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed)


def _train(cfg: RunConfig, run: Run, accelerator: Accelerator) -> dict:
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    seed_everything(cfg.seed)
    task = get_task(cfg.task.name, **cfg.task.options)
    splits = load_data(cfg, task)
    if accelerator.is_main_process:
        for name in SPLITS:
            write_examples(run.path / split_file(name), getattr(splits, name))
    blocks = Method(cfg.method).uses_blocks
    # Without blocks the readout must see the question, whatever the memory section says.
    spec = cfg.memory.replace(
        method=cfg.method,
        task=task.name,
        K=cfg.memory.K if blocks else 0,
        readout_sees_question=cfg.memory.readout_sees_question or not blocks,
    )
    model, tokenizer = make_model(cfg, spec, all_texts(splits.train + splits.val + splits.test))
    builder = SequenceBuilder(tokenizer, spec.replace(K=cfg.memory.K), task.join_steps)
    model = accelerator.prepare(model)

    summary: dict = {"stages": {}}
    monitor = splits.val[: min(len(splits.val), 256)]
    for stage in plan_stages(cfg, builder):
        seed_everything(cfg.seed)
        summary["stages"][stage.name] = run_stage(
            stage,
            model,
            splits.train,
            monitor,
            cfg,
            accelerator,
            run,
            tokenizer.pad_token_id,
            spec.readout_sees_question,
        )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return summary

    # Without the autocast wrapper: the saved model and its evaluation are plain fp32.
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if hasattr(model, "merge_and_unload"):  # LoRA: save a plain transformers model
        model = model.merge_and_unload()
    set_dropout(model, 0.0)
    save_checkpoint(model, tokenizer, spec, run.model_dir)
    summary["train_time_s"] = sum(s["time_s"] for s in summary["stages"].values())
    summary["tokens_seen"] = sum(s["tokens_seen"] for s in summary["stages"].values())

    metrics, predictions = score(model, tokenizer, spec, splits, cfg)
    metrics.update(
        train_time_s=summary["train_time_s"],
        tokens_seen=summary["tokens_seen"],
        train_steps=cfg.train.steps,
        splits=splits.summary(task),
    )
    write_results(run, metrics, predictions)
    summary["accuracy"] = metrics["accuracy"]
    return summary


def score(
    model, tokenizer, spec: MemorySpec, splits: Splits, cfg: RunConfig
) -> tuple[dict, dict[str, list[dict]]]:
    """Metrics on the validation set and, unless `eval.score_test` is off, on the test set.

    The test set's figures are the run's headline (`accuracy` = `test_accuracy`); `val_*` are what
    settings are chosen on. Predictions come back per split.
    """
    e = cfg.eval
    scored = {"val": splits.val} | ({"test": splits.test} if e.score_test else {})
    budget = resolve_max_new_tokens(cfg, tokenizer, spec, splits.train + splits.val)
    results = {}
    for name, examples in scored.items():
        results[name] = evaluate(
            model,
            tokenizer,
            spec,
            examples[: e.n] if e.n else examples,
            task_options=cfg.task.options,
            batch_size=e.batch_size,
            latency_examples=e.latency_examples if name == "test" or not e.score_test else 0,
            max_new_tokens=budget,
        )
    headline = results["test" if e.score_test else "val"][0]
    metrics = dict(headline, scored_on="test" if e.score_test else "val", max_new_tokens=budget)
    for name, (m, _) in results.items():
        for key in ("accuracy", "any_block_accuracy", "per_block_accuracy"):
            for suffix in ("", "_ci"):
                if key + suffix in m:
                    metrics[f"{name}_{key}{suffix}"] = m[key + suffix]
        metrics[f"n_{name}"] = m["n_eval"]
    return metrics, {name: p for name, (_, p) in results.items()}


def resolve_max_new_tokens(cfg: RunConfig, tokenizer, spec: MemorySpec, seen: list[Example]) -> int:
    """`eval.max_new_tokens`, or when unset the longest target of `seen` (training and validation
    examples) plus a margin: see `decode_budget`."""
    if cfg.eval.max_new_tokens is not None:
        return cfg.eval.max_new_tokens
    task = get_task(cfg.task.name, **cfg.task.options)
    return decode_budget(SequenceBuilder(tokenizer, spec, task.join_steps), seen)


def write_results(run: Run, metrics: dict, predictions: dict[str, list[dict]], suffix: str = "") -> None:
    """metrics{suffix}.json and predictions{suffix}[_split].jsonl (test unsuffixed), written atomically."""
    run.write_json(f"metrics{suffix}.json", metrics)
    for split, records in predictions.items():
        name = f"predictions{suffix}{'' if split == 'test' else '_' + split}.jsonl"
        atomic_write_text(run.path / name, "".join(json.dumps(p) + "\n" for p in records))
