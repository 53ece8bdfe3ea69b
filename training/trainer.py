"""The training loop, top to bottom: data, model, stages, checkpoint, evaluation.

RiM trains in two stages (grounding, then refinement) with the optimizer and LR schedule reset
at the switch; the baselines (direct, cot, pause) run one stage with the same trainer, data and
step budget. Coconut runs its curriculum (CoT, then steps replaced by continuous thoughts stage
by stage) as stages of the same loop, the optimizer reset at each, with its own loss: the
thought passes of `rim_lens.model.coconut`. The loop runs unchanged on one process or under
`accelerate launch` (Coconut's several passes per step are tested on one process only).
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
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from rim_lens.artefacts import SPLITS, split_file
from rim_lens.data import Example, Splits, make_splits, read_examples, write_examples
from rim_lens.data.tasks import Task, get_task
from rim_lens.errors import ConfigError, RunError
from rim_lens.evaluation import evaluate
from rim_lens.fileio import atomic_write_text
from rim_lens.methods import Method
from rim_lens.model.checkpoints import build_model, load_pretrained, save_checkpoint, set_dropout
from rim_lens.model.coconut import thought_forward
from rim_lens.model.layouts import Batch, Layout, SequenceBuilder, collate
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer, memory_token_ids
from rim_lens.runs import Run
from training.config import RunConfig
from training.schedules import coconut_stage, grounding_weights, refinement_weights


@dataclass
class Stage:
    """One optimisation phase: its layout of examples, loss weights, steps, LR and dropout, and
    its loss if not the one-pass weighted cross-entropy (`_loss`)."""

    name: str
    steps: int
    lr: float
    dropout: float
    layout: Callable[[Example], Layout]
    weights: Callable[[Batch, float], torch.Tensor]  # (batch, progress in [0, 1]) -> [B, S]
    # (model, batch, weights [B, S]) -> (loss, logits [B, S, V])
    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def plan_stages(cfg: RunConfig, builder: SequenceBuilder) -> list[Stage]:
    """RiM: grounding then refinement; pause: refinement only; direct and CoT: one stage;
    Coconut: stages 0..S of its curriculum then the all-thoughts stage S + 1."""
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
    if cfg.method == "coconut":
        return coconut_stages(cfg, builder)
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


def run_spec(cfg: RunConfig, task: Task) -> MemorySpec:
    """The memory spec the run's checkpoint is saved with: the recipe's memory section plus the
    method, the task and (Coconut) the inference thought count, c x stages."""
    method = Method(cfg.method)
    # Without blocks the readout must see the question, whatever the memory section says.
    return cfg.memory.replace(
        method=cfg.method,
        task=task.name,
        K=cfg.memory.K if method.uses_blocks else 0,
        readout_sees_question=cfg.memory.readout_sees_question or not method.uses_blocks,
        thoughts=cfg.coconut.c * cfg.coconut.stages if method.uses_thoughts else 0,
    )


def make_model(cfg: RunConfig, spec: MemorySpec, texts: list[str]):
    """(model, tokenizer): from scratch with a word-level tokenizer, or a pretrained LM (+LoRA)."""
    m = cfg.model
    if m.pretrained is None:
        tokenizer = build_word_tokenizer(texts, spec)
        model = build_model(tokenizer, m.arch, m.preset, m.max_positions, cfg.train.dropout, cfg.seed)
        return model, tokenizer
    model, tokenizer = load_pretrained(m.pretrained, spec, trust_remote_code=m.trust_remote_code)
    if m.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = dict(m.lora)
        lora.setdefault("target_modules", "all-linear")
        try:
            config = LoraConfig(
                task_type="CAUSAL_LM", trainable_token_indices=list(memory_token_ids(tokenizer, spec)), **lora
            )
        except TypeError as err:
            raise ConfigError(f"model.lora: {err}") from None
        model = get_peft_model(model, config)
    return model, tokenizer


def coconut_stages(cfg: RunConfig, builder: SequenceBuilder) -> list[Stage]:
    """Coconut's curriculum as stages (`schedules.coconut_stage`): stage 0 gets
    `coconut.cot_fraction` of the steps, stages 1..S `coconut.stage_fraction` each, stage S + 1
    the rest; all use the recipe's LR and dropout, and the loss covers the remaining steps and
    the answer."""
    t, co = cfg.train, cfg.coconut
    per_stage = round(t.steps * co.stage_fraction)
    cot = per_stage if co.cot_fraction is None else round(t.steps * co.cot_fraction)
    plain = lambda b, s: (b.target_index > 0).float()  # noqa: E731
    stages = []
    for s in range(co.stages + 2):
        n_thoughts, skip = coconut_stage(s, co.c, co.stages)
        steps = cot if s == 0 else per_stage if s <= co.stages else t.steps - cot - per_stage * co.stages
        layout = partial(builder.thoughts, n_thoughts=n_thoughts, skip_steps=skip)
        stages.append(Stage(f"stage_{s}", steps, t.lr, t.dropout, layout, plain, loss=coconut_loss))
    return [s for s in stages if s.steps > 0]


def all_texts(examples: list[Example]) -> list[str]:
    return [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]


# -- monitoring ----------------------------------------------------------------------------------
@torch.no_grad()
def readout_accuracy(logits: torch.Tensor, batch: Batch, stage: str) -> dict[str, float]:
    """Teacher-forced accuracy of each readout (all its tokens right), named step_t / answer
    in grounding and block_k in refinement."""
    wrong = (logits.argmax(-1) != batch.targets) & (batch.target_index > 0)
    n = int(batch.target_index.max())
    out: dict[str, float] = {}
    for t in range(1, n + 1):
        present = (batch.target_index == t).any(1)
        ok = ~(wrong & (batch.target_index == t)).any(1)
        if stage == "grounding":
            for name, rows in (("answer", batch.n_steps + 1 == t), (f"step_{t}", batch.n_steps >= t)):
                rows = rows & present
                if rows.any():
                    out.setdefault(name, [])
                    out[name] += ok[rows].tolist()
        elif present.any():
            out[f"block_{t}" if stage == "refinement" else "answer"] = ok[present].float().mean().item()
    return {k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in out.items()}


def _loss(model, batch: Batch, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**batch.model_inputs(), use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="none")
    # Normalised by the weights in the batch: as lambda falls, the answer term keeps its scale.
    loss = (ce.view_as(weights) * weights).sum() / weights.sum().clamp_min(1e-8)
    return loss, logits


def coconut_loss(model, batch: Batch, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_loss` with the continuous thoughts fed back: n + 1 passes sharing a KV cache, gradients
    through the thoughts (as the reference implementation)."""
    logits = thought_forward(model, batch).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="none")
    loss = (ce.view_as(weights) * weights).sum() / weights.sum().clamp_min(1e-8)
    return loss, logits


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
    compute_loss = stage.loss or _loss
    set_dropout(model, stage.dropout)
    batches = partial(collate, pad_id=pad_id, sees_question=sees_question)
    loader = DataLoader(
        [stage.layout(ex) for ex in train_set],
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= t.batch_size,
        collate_fn=batches,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    monitor_batch = batches([stage.layout(ex) for ex in monitor]).to(accelerator.device)
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
        model.eval()
        with torch.no_grad():
            _, logits = compute_loss(model, monitor_batch, stage.weights(monitor_batch, step / stage.steps))
        model.train()
        acc = readout_accuracy(logits, monitor_batch, stage.name)
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
            loss, _ = compute_loss(model, batch, weights)
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
            f"[{cfg.method}] {stage.name}: {step} steps in {time.perf_counter() - start:.0f}s; "
            f"held-out readout accuracy: {shown}"
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
    accelerator = Accelerator()
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


def _train(cfg: RunConfig, run: Run, accelerator: Accelerator) -> dict:
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    seed_everything(cfg.seed)
    task = get_task(cfg.task.name, **cfg.task.options)
    splits = load_data(cfg, task)
    if accelerator.is_main_process:
        for name in SPLITS:
            write_examples(run.path / split_file(name), getattr(splits, name))
    spec = run_spec(cfg, task)
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

    model = accelerator.unwrap_model(model)
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
            max_new_tokens=e.max_new_tokens,
        )
    headline = results["test" if e.score_test else "val"][0]
    metrics = dict(headline, scored_on="test" if e.score_test else "val")
    for name, (m, _) in results.items():
        for key in ("accuracy", "any_block_accuracy", "per_block_accuracy"):
            for suffix in ("", "_ci"):
                if key + suffix in m:
                    metrics[f"{name}_{key}{suffix}"] = m[key + suffix]
        metrics[f"n_{name}"] = m["n_eval"]
    return metrics, {name: p for name, (_, p) in results.items()}


def write_results(run: Run, metrics: dict, predictions: dict[str, list[dict]], suffix: str = "") -> None:
    """metrics{suffix}.json and predictions{suffix}[_split].jsonl (test unsuffixed), written atomically."""
    run.write_json(f"metrics{suffix}.json", metrics)
    for split, records in predictions.items():
        name = f"predictions{suffix}{'' if split == 'test' else '_' + split}.jsonl"
        atomic_write_text(run.path / name, "".join(json.dumps(p) + "\n" for p in records))
