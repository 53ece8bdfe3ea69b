"""The training loop, top to bottom: data, model, stages, checkpoint, evaluation.

RiM trains in two stages (grounding, then refinement) with the optimizer and LR schedule reset
at the switch; the baselines (direct, cot, pause) run one stage with the same trainer, data and
step budget. Coconut runs its curriculum (CoT, then steps replaced by continuous thoughts stage
by stage) as stages of the same loop, the optimizer reset at each, with its own loss: the
thought passes of `rim_lens.model.coconut`. The loop runs unchanged on one process or under
`accelerate launch` (Coconut's several passes per step are tested on one process only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, extract_model_from_parallel
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from rim_lens import artefacts
from rim_lens.artefacts import SPLITS, split_file
from rim_lens.data import Example, Splits, make_splits, read_examples, write_examples
from rim_lens.data.tasks import Task, get_task
from rim_lens.errors import ConfigError, RimLensError, RunError, clip
from rim_lens.evaluation import decode_budget, evaluate
from rim_lens.fileio import (
    atomic_write_many,
    atomic_write_text,
    is_temp,
    recover_dir,
    remove_dir,
    replace_dir,
)
from rim_lens.methods import Method
from rim_lens.model import spread
from rim_lens.model.checkpoints import build_model, load_pretrained, save_checkpoint, set_dropout
from rim_lens.model.coconut import thought_forward
from rim_lens.model.layouts import IGNORE, Batch, Layout, SequenceBuilder, collate
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer, memory_token_ids
from rim_lens.progress import Progress, logger
from rim_lens.runs import (
    COMPLETED,
    DIVERGED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    Run,
    RunLock,
    recover_swap,
    staging_path,
)
from training import resume as resumption
from training import tracking
from training.config import RunConfig, check_data_tokens, differences, layout_problem, load_config
from training.sampling import LengthBuckets
from training.schedules import coconut_stage, grounding_weights, refinement_weights

# train.precision -> accelerate's mixed_precision: autocast in bf16 / fp16, weights kept in fp32.
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SPREAD_EXAMPLES = 64  # validation questions the input share of block states is measured on


# (model, batch) -> logits [N, V] at the batch's N target positions, in row-major order
Logits = Callable[..., torch.Tensor]


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


def coconut_logits(model, batch: Batch) -> torch.Tensor:
    """`target_logits` with the continuous thoughts fed back: n + 1 passes sharing a KV cache,
    gradients through the thoughts (as the reference implementation)."""
    return thought_forward(model, batch).logits[batch.targets != IGNORE]


def _loss(model, batch: Batch, weights: torch.Tensor, logits: Logits = target_logits) -> torch.Tensor:
    """Cross-entropy at the target positions, weighted by `weights` [B, S] (zero off targets)."""
    is_target = batch.targets != IGNORE
    ce = F.cross_entropy(logits(model, batch).float(), batch.targets[is_target], reduction="none")
    # Normalised by the weights in the batch: as lambda falls, the answer term keeps its scale.
    return (ce * weights[is_target]).sum() / weights.sum().clamp_min(1e-8)


def predicted_tokens(model, batch: Batch, logits: Logits = target_logits) -> torch.Tensor:
    """Greedy next tokens [B, S] at the target positions (teacher-forced), IGNORE elsewhere."""
    predicted = torch.full_like(batch.targets, IGNORE)
    predicted[batch.targets != IGNORE] = logits(model, batch).argmax(-1)
    return predicted


@dataclass
class Stage:
    """One optimisation phase: its layout of examples, loss weights, steps, LR and dropout, and
    how it computes logits at the target positions (one pass, or Coconut's thought passes)."""

    name: str
    steps: int
    lr: float
    dropout: float
    layout: Callable[[Example], Layout]
    weights: Callable[[Batch, float], torch.Tensor]  # (batch, progress in [0, 1]) -> [B, S]
    logits: Logits = target_logits
    held_out: Callable[[Example], Layout] | None = None  # the held-out check's layout (None: `layout`)
    largest: Callable[[Example], Layout] | None = None  # the longest `layout` can be (None: `layout`)
    lr_key: str = "train.lr"  # the recipe key of `lr`, for the divergence message


def varied_budget(builder: SequenceBuilder, Ks: list[int], Ms: list[int], seed: int) -> Callable:
    """The refinement layout with each example's K and M drawn uniformly from `Ks` and `Ms`, the
    same for an example in every epoch and run of this seed (drawn from the example's id)."""

    def layout(ex: Example) -> Layout:
        rng = random.Random(f"{seed}:{ex.id}")
        return builder.refinement(ex, n_blocks=rng.choice(Ks), n_memory=rng.choice(Ms))

    return layout


def plan_stages(cfg: RunConfig, builder: SequenceBuilder) -> list[Stage]:
    """RiM: grounding then refinement; pause: refinement only; direct and CoT: one stage;
    Coconut: stages 0..S of its curriculum then the all-thoughts stage S + 1."""
    t = cfg.train
    # Each row's K is its last block (a varied budget gives rows different K).
    refine = lambda b, s: refinement_weights(b.target_index, b.blocks.amax(1, keepdim=True), t.alpha)  # noqa: E731
    plain = lambda b, s: (b.target_index > 0).float()  # noqa: E731
    refinement = {"layout": builder.refinement}
    if t.K_choices or t.M_choices:
        Ks, Ms = t.K_choices or [cfg.memory.K], t.M_choices or [cfg.memory.M]
        refinement = {
            "layout": varied_budget(builder, Ks, Ms, cfg.seed),
            "held_out": builder.refinement,
            "largest": partial(builder.refinement, n_blocks=max(Ks), n_memory=max(Ms)),
        }
    if cfg.method == "rim":
        stage1 = round(t.steps * t.stage1_fraction)
        ground = lambda b, s: grounding_weights(b.target_index, b.n_steps, s, t.lambda_hold)  # noqa: E731
        stages = [
            Stage("grounding", stage1, t.lr, t.dropout, builder.grounding, ground),
            Stage(
                "refinement",
                t.steps - stage1,
                t.stage2_lr,
                t.stage2_dropout,
                weights=refine,
                lr_key="train.stage2_lr",
                **refinement,
            ),
        ]
        return [s for s in stages if s.steps > 0]
    if cfg.method == "pause":
        return [Stage("refinement", t.steps, t.lr, t.dropout, weights=refine, **refinement)]
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
            logger.info(f"{path}: skipped {skipped} invalid lines")
        return examples

    splits = make_splits(task, d.train, d.val, d.test, d.seed, read)
    if splits.dropped_from_train:
        logger.info(f"data: dropped {splits.dropped_from_train} training examples whose question is held out")
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
    else:
        model, tokenizer = load_pretrained(m.pretrained, spec, trust_remote_code=m.trust_remote_code)
        if m.lora is not None:
            model = _with_lora(model, m.lora, memory_token_ids(tokenizer, spec))
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing is correct with frozen inputs (LoRA) and without use_cache.
        model.activation_checkpointing_enable({"use_reentrant": False})
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
        stages.append(Stage(f"stage_{s}", steps, t.lr, t.dropout, layout, plain, logits=coconut_logits))
    return [s for s in stages if s.steps > 0]


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
    model,
    layouts: list[Layout],
    stage: str,
    collate_fn: Callable[[list[Layout]], Batch],
    device,
    chunk: int,
    logits: Logits = target_logits,
) -> dict[str, float]:
    """Teacher-forced readout accuracy (see `readout_hits`) over `layouts`, `chunk` sequences per
    forward pass, taken in order of length so that chunks carry little padding."""
    training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    by_length = sorted(layouts, key=len)
    for start in range(0, len(by_length), chunk):
        batch = collate_fn(by_length[start : start + chunk]).to(device)
        for name, ok in readout_hits(predicted_tokens(model, batch, logits), batch, stage).items():
            hits.setdefault(name, []).extend(ok)
    model.train(training)
    return {name: sum(hits[name]) / len(hits[name]) for name in sorted(hits, key=_readout_order)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- stopping -----------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGTERM or SIGINT; the run is marked interrupted and can be resumed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT during training. Inside the training loop (`deferring`) the first signal
    asks the loop to checkpoint and stop after the current step; a second one, or one outside the
    loop, stops at once. Installed only in the main thread (where Python delivers signals)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self.deferring = False
        self._previous: dict = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.deferring and self.requested is None:
            self.requested = signum
            return
        raise Interrupted(signum)

    def check(self) -> None:
        if self.requested is not None:
            raise Interrupted(self.requested)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# -- the loop ------------------------------------------------------------------------------------
Save = Callable[..., None]


class Diverged(RunError):
    """Training met a non-finite loss or gradient; the run keeps its last checkpoint."""


@dataclass
class FiniteGuard:
    """Stops a stage at the first non-finite loss, or non-finite gradient, with what the user needs
    to know. Under fp16 a loss scaler skips the steps whose gradients overflow and lowers its scale:
    those steps are not divergence, so `scaled` leaves gradients to it."""

    stage: Stage
    scaled: bool
    last: tuple[int, float] | None = None  # (step, loss) of the last finite step

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> float:
        """The loss as a number, or Diverged at `step` (1-based)."""
        value = loss.item()
        if math.isfinite(value) and (self.scaled or bool(torch.isfinite(grad_norm))):
            self.last = (step, value)
            return value
        what = f"loss {value}" if not math.isfinite(value) else f"gradient norm {float(grad_norm)}"
        before = f"last finite loss {self.last[1]:.4g} at step {self.last[0]}" if self.last else "none before"
        raise Diverged(
            f"training diverged at step {step} of {self.stage.name}: {what} ({before}); "
            f"lower {self.stage.lr_key} (now {self.stage.lr:g})"
        )


def run_stage(
    stage: Stage,
    index: int,
    model,
    train_set: list[Example],
    monitor: list[Example],
    cfg: RunConfig,
    accelerator: Accelerator,
    run: Run,
    pad_id: int,
    sees_question: bool,
    checkpoint: Save,
    stop: StopSignals,
    resume: resumption.Checkpoint | None = None,
) -> dict[str, float]:
    """Train one stage with a fresh optimizer and LR schedule (or, from `resume`, the ones it had
    when it was checkpointed); returns the final monitor accuracy."""
    t = cfg.train
    set_dropout(model, stage.dropout)
    batches = partial(collate, pad_id=pad_id, sees_question=sees_question)
    # The order of every epoch comes from this generator, reseeded per epoch (see training/resume.py).
    order = torch.Generator()
    layouts = [stage.layout(ex) for ex in train_set]
    drop_last = len(train_set) >= t.batch_size
    if t.length_bucketing:
        sampler = LengthBuckets([len(x) for x in layouts], t.batch_size, drop_last=drop_last, generator=order)
        # `generator` too: the loader draws a base seed each epoch, which must not come from the
        # global RNG (dropout's), or a resumed run would draw it at a different point.
        loader = DataLoader(layouts, batch_sampler=sampler, collate_fn=batches, generator=order)
    else:
        loader = DataLoader(
            layouts,
            batch_size=t.batch_size,
            shuffle=True,
            drop_last=drop_last,
            collate_fn=batches,
            generator=order,
        )
    monitor_layouts = [(stage.held_out or stage.layout)(ex) for ex in monitor]
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
            model, monitor_layouts, stage.name, batches, accelerator.device, cfg.eval.batch_size, stage.logits
        )
        if accelerator.is_main_process:
            run.log({"stage": stage.name, "step": step, "readout_accuracy": acc})
        return acc

    at, tokens, elapsed, acc = resumption.Position(index), 0, 0.0, {}
    if resume is not None:
        resume.restore_training(optimizer, scheduler)
        s = resume.state
        at, tokens, elapsed, acc = s.position, s.tokens, s.elapsed_s, s.readout_accuracy
    step = at.step

    def save() -> None:
        position = resumption.Position(index, step, epoch, consumed)
        checkpoint(position, optimizer, scheduler, tokens, time.perf_counter() - start, acc)

    model.train()
    # `disable` is left to tqdm on the main process, so TQDM_DISABLE=1 silences the bar.
    quiet = {} if accelerator.is_main_process else {"disable": True}
    bar = Progress(total=stage.steps, initial=step, desc=f"{cfg.method}:{stage.name}", unit="step", **quiet)
    start = time.perf_counter() - elapsed
    epoch, consumed = at.epoch, at.batch
    loss_fn = partial(_loss, logits=stage.logits)
    guard = FiniteGuard(stage, scaled=accelerator.scaler is not None)
    stop.deferring = True
    while step < stage.steps:
        order.manual_seed(resumption.epoch_seed(cfg.seed, index, epoch))
        for batch in accelerator.skip_first_batches(loader, consumed) if consumed else loader:
            weights = stage.weights(batch, step / stage.steps)
            loss = loss_fn(model, batch, weights)
            accelerator.backward(loss)
            if t.grad_clip:
                norm = accelerator.clip_grad_norm_(params, t.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            guard.check(step + 1, loss, norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += 1
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
            if stop.requested is not None or (t.checkpoint_every and step % t.checkpoint_every == 0):
                save()
                stop.check()
        else:
            epoch, consumed = epoch + 1, 0
    stop.deferring = False
    bar.close()
    if accelerator.is_main_process:
        shown = "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        took = time.perf_counter() - start
        logger.info(
            f"[{cfg.method}] {stage.name}: {step} steps in {took:.0f}s; held-out readout accuracy: {shown}"
        )
    return {"time_s": time.perf_counter() - start, "tokens_seen": tokens, "readout_accuracy": acc}


@dataclass
class Setup:
    """What a run trains with, built before anything is written: a bad input fails here and
    leaves the runs directory untouched."""

    task: Task
    splits: Splits
    spec: MemorySpec
    model: Any
    tokenizer: Any
    builder: SequenceBuilder
    stages: list[Stage]
    data: str  # fingerprint of the splits


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


def prepare(cfg: RunConfig) -> Setup:
    """Data, model, tokenizer and stages of `cfg`; every input is checked here."""
    torch.set_num_threads(threads(cfg.train.threads))
    seed_everything(cfg.seed)
    task = get_task(cfg.task.name, **cfg.task.options)
    splits = load_data(cfg, task)
    spec = run_spec(cfg, task)
    check_data_tokens(cfg, spec, [(name, getattr(splits, name)) for name in SPLITS])
    model, tokenizer = make_model(cfg, spec, all_texts(splits.train + splits.val + splits.test))
    builder = SequenceBuilder(tokenizer, spec.replace(K=cfg.memory.K), task.join_steps)
    stages = plan_stages(cfg, builder)
    check_positions(cfg, model, builder, stages, splits)
    data = resumption.fingerprint([splits.train, splits.val, splits.test])
    return Setup(task, splits, spec, model, tokenizer, builder, stages, data)


def threads(wanted: int | None) -> int:
    """`train.threads`, at most the CPUs this process may use (more only slow training down)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if wanted is not None and wanted > cpus:
        print(f"rim-lens: warning: train.threads {wanted} is more than the {cpus} CPUs here; using {cpus}")
    return min(wanted or cpus, cpus)


def position_limit(model) -> int | None:
    """How many positions the model takes (None if it does not say)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def longest(layout: Callable[[Example], Layout], examples: list[Example]) -> tuple[int, Example | None]:
    """The most positions any example's layout needs, and that example."""
    need, worst = 0, None
    for ex in examples:
        n = max(layout(ex).positions) + 1
        if n > need:
            need, worst = n, ex
    return need, worst


def check_positions(
    cfg: RunConfig, model, builder: SequenceBuilder, stages: list[Stage], splits: Splits
) -> None:
    """ConfigError unless the model takes the memory layout, the longest training sequence, and
    the longest scored prompt with the answer it decodes (up to the decoding budget)."""
    limit = position_limit(model)
    if not limit:
        return
    _, problem = layout_problem(cfg, limit)
    if problem:
        raise ConfigError(f"{problem}; the model's positions are fixed")
    fix = (
        "set model.max_positions to at least {need}"
        if cfg.model.pretrained is None
        else "shorten the data or use fewer memory blocks (memory.K)"
    )
    for stage in stages:
        need, ex = longest(stage.largest or stage.layout, splits.train)
        if need > limit:
            _too_long(limit, f"the {stage.name} sequence of example {clip(ex.id, 40)}", need, fix)
    held_out = splits.val + splits.test
    need, ex = longest(builder.scored, held_out)
    if need > limit:
        _too_long(limit, f"the scored sequence of example {clip(ex.id, 40)}", need, fix)
    # Decoding feeds the answer back after the prompt: up to max_new_tokens - 1 more positions.
    budget = resolve_max_new_tokens(cfg, builder.tokenizer, builder.spec, splits.train + splits.val)
    prompt, ex = longest(builder.prompt, held_out)
    if prompt + budget - 1 > limit:
        what = f"decoding example {clip(ex.id, 40)} ({prompt} prompt positions, then up to {budget} tokens)"
        _too_long(limit, what, prompt + budget - 1, fix + " (or lower eval.max_new_tokens)")


def _too_long(limit: int, what: str, need: int, fix: str) -> None:
    raise ConfigError(
        f"model.max_positions: the model takes {limit} positions but {what} needs {need}; "
        + fix.format(need=need)
    )


# -- runs: start, resume, overwrite --------------------------------------------------------------
@dataclass
class Plan:
    """Where a `train` call trains (the run itself, or its staging directory under --overwrite)
    and whether it resumes a checkpoint there."""

    path: Path
    resume: bool
    staging: bool


def recipe_change(cfg: RunConfig, run: Run) -> str | None:
    """The first recipe key whose value differs from what the run was started with (None if none)."""
    try:
        saved = load_config(run.require(artefacts.CONFIG))
    except RimLensError as err:
        raise RunError(f"{err}; pass --restart to train the run again from the start") from None
    diff = differences(cfg, saved)
    if not diff:
        return None
    key = diff[0]
    get = lambda c: functools.reduce(lambda d, k: d[k], key.split("."), c.to_dict())  # noqa: E731
    return f"{key}: {clip(repr(get(saved)), 30)} -> {clip(repr(get(cfg)), 30)}"


def plan_run(cfg: RunConfig, target: Run, overwrite: bool, restart: bool) -> Plan:
    """Decide how to train `cfg` into `target` (see `train`); RunError if it must not."""
    recover_swap(target.path)
    if target.path.exists() and not target.path.is_dir():
        raise RunError(f"{target.path}: exists and is not a directory; choose another --name or --runs-dir")
    try:
        status = target.status()["status"] if target.path.is_dir() else "none"
    except RunError as err:
        if not restart:
            raise RunError(f"{err}; pass --restart to train the run again from the start") from None
        status = FAILED
    if status == COMPLETED and target.exists(artefacts.CHECKPOINT):
        shutil.rmtree(target.checkpoint_dir, ignore_errors=True)  # a kill right after completing
    legacy = status == "unknown" and (target.exists(artefacts.MODEL) or target.exists(artefacts.CONFIG))
    # What a run killed before its first status leaves is its own temporary files: no foreign run.
    if status == "unknown" and not legacy and any(not is_temp(p) for p in target.path.iterdir()):
        raise RunError(
            f"{target.path}: exists and is not a rim-lens run; choose another --name or --runs-dir"
        )
    if status == RUNNING and not restart:  # on another host: its process cannot be checked from here
        host = (target.status().get("process") or {}).get("host")
        raise RunError(
            f"{target.path}: is being trained on host {host}; wait for it, or pass --restart if that "
            "training is gone"
        )
    if status == COMPLETED or legacy:
        if not overwrite:
            raise RunError(
                f"{target.path}: already holds a trained run; pass --overwrite to replace it (the old run "
                "stays until the new one completes), or choose another --name"
            )
        staging = Run(staging_path(target.path))
        recover_dir(staging.checkpoint_dir)
        resumable = staging.exists(artefacts.CHECKPOINT) and not restart
        return Plan(staging.path, resumable and recipe_change(cfg, staging) is None, True)
    recover_dir(target.checkpoint_dir)  # a kill between a checkpoint's two renames
    if target.exists(artefacts.CHECKPOINT) and not restart:
        change = recipe_change(cfg, target)
        if change is None:
            return Plan(target.path, True, False)
        if overwrite:
            return Plan(staging_path(target.path), False, True)
        state = "diverged" if status == DIVERGED else "interrupted"
        raise RunError(
            f"{target.path}: this {state} run was started with another recipe ({change}); "
            "train it with its own recipe to resume it, or pass --restart to start it over with this one"
        )
    return Plan(target.path, False, False)


def train(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False, restart: bool = False) -> Run:
    """Train `cfg` into `run_dir`, save the model, evaluate; the run's status says how it ended.

    - A new run trains into `run_dir`; a run that was interrupted (killed, SIGTERM, Ctrl-C) is
      resumed from its last checkpoint, bit for bit, if the recipe is the same; `restart` starts
      it over instead.
    - A completed run is refused unless `overwrite`: then the new run trains in a staging
      directory beside it and replaces it only once it has completed (an interrupted overwrite
      resumes there too). The old run is untouched if the new one fails.
    - While it trains, the run is locked: a second `train` into it is refused.
    """
    target = Run(run_dir)
    accelerator = make_accelerator(cfg.train.precision)
    main = accelerator.is_main_process
    with RunLock(target.path) if main else contextlib.nullcontext(), StopSignals() as stop:
        plan: Plan | RimLensError | None = None
        if main:
            try:
                plan = plan_run(cfg, target, overwrite, restart)
            except RimLensError as err:
                plan = err  # every process must stop, not only this one
        if accelerator.num_processes > 1:
            plan = broadcast_object_list([plan])[0]
        if isinstance(plan, RimLensError):
            raise plan
        setup = prepare(cfg)
        run = Run(plan.path)
        ckpt = resumption.Checkpoint.read(run.checkpoint_dir) if plan.resume else None
        if ckpt is not None and ckpt.state.data != setup.data:
            raise RunError(
                f"{run.path}: the recipe's data changed since this run started; {resumption.RESTART}"
            )
        if ckpt is not None:
            ckpt.check_position([stage.steps for stage in setup.stages])
        if main:
            _open(run, cfg, setup, ckpt, plan.staging)
        accelerator.wait_for_everyone()
        try:
            with tracking.mirrored(run, cfg.train.report_to, target.name, cfg.to_dict(), main):
                summary = _train(cfg, run, setup, accelerator, stop, ckpt)
        except KeyboardInterrupt as err:
            if main:
                where = "; resume it by running the same command"
                run.mark(INTERRUPTED, method=cfg.method, error=f"{type(err).__name__}: {err}{where}")
            raise
        except Diverged as err:
            kept = resumption.Checkpoint.position_of(run.checkpoint_dir)
            kept = f"checkpoint kept: {kept}" if kept else "no checkpoint"
            message = f"{run.path}: {err} and pass --restart ({kept})"
            if main:
                run.mark(DIVERGED, method=cfg.method, error=message)
            raise Diverged(message) from None
        except BaseException as err:
            if main:
                run.mark(FAILED, method=cfg.method, error=f"{type(err).__name__}: {err}")
            raise
        if main:
            run.mark(COMPLETED, method=cfg.method, **summary)
            shutil.rmtree(run.checkpoint_dir, ignore_errors=True)
            if plan.staging:
                replace_dir(run.path, target.path)
        # Other processes return only once the main one has saved and evaluated.
        accelerator.wait_for_everyone()
    return target


def _open(run: Run, cfg: RunConfig, setup: Setup, ckpt: resumption.Checkpoint | None, staging: bool) -> None:
    """Prepare the run directory: a fresh one (anything an earlier attempt left is removed), or
    the resumed one with its log as it was at the checkpoint."""
    p = ckpt.state.position if ckpt else None
    resumed = {"resumed_from": asdict(p)} if p else {}
    if ckpt is None:
        # Only what rim-lens made is removed: a run that did not complete, or a staging directory.
        if run.path.exists() and (run.exists(artefacts.STATUS) or staging):
            remove_dir(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        # The status comes first: a run killed from here on reads as interrupted, never as foreign.
        run.mark(RUNNING, method=cfg.method)
        for name in SPLITS:
            write_examples(run.path / split_file(name), getattr(setup.splits, name))
    else:
        run.mark(RUNNING, method=cfg.method, **resumed)
        atomic_write_text(run.path / artefacts.TRAIN_LOG, ckpt.log)
    atomic_write_text(run.path / artefacts.CONFIG, cfg.to_yaml())


def _train(
    cfg: RunConfig,
    run: Run,
    setup: Setup,
    accelerator: Accelerator,
    stop: StopSignals,
    ckpt: resumption.Checkpoint | None,
) -> dict:
    main = accelerator.is_main_process
    model, tokenizer, spec, splits = setup.model, setup.tokenizer, setup.spec, setup.splits
    at = ckpt.state.position if ckpt else resumption.Position()
    # The paper's PCA finding, measured on the same validation questions before training and
    # after each stage. Before: the freshly built model (deterministic from the seed, so a
    # resumed run measures the same), or the pretrained base (LoRA starts as the identity).
    spread_prompts = [setup.builder.prompt(ex) for ex in splits.val[:SPREAD_EXAMPLES]]
    if spec.uses_blocks and main:
        before = spread.measure(model, spread_prompts, tokenizer.pad_token_id, spec.readout_sees_question)
    if ckpt is not None:
        ckpt.restore_model(model)
    model = accelerator.prepare(model)
    summary: dict = {"stages": dict(ckpt.state.stages) if ckpt else {}}

    def checkpoint(position, optimizer=None, scheduler=None, tokens=0, elapsed=0.0, acc=None) -> None:
        if main:
            state = resumption.TrainState(position, setup.data, tokens, elapsed, acc or {}, summary["stages"])
            resumption.save(
                run.checkpoint_dir,
                accelerator.unwrap_model(model),
                state,
                run.file(artefacts.TRAIN_LOG),
                optimizer,
                scheduler,
            )
            if cfg.train.snapshots:
                done = sum(s.steps for s in setup.stages[: position.stage]) + position.step
                name = artefacts.snapshot_name(done)
                snapshot = run.file(artefacts.SNAPSHOTS) / name
                save_checkpoint(accelerator.unwrap_model(model), tokenizer, spec, snapshot)

    if ckpt is None and cfg.train.checkpoint_every:
        checkpoint(resumption.Position())  # the start: what a run that diverges at once keeps
    monitor = splits.val[: min(len(splits.val), 256)]
    for index, stage in enumerate(setup.stages):
        if index < at.stage:
            continue
        resume = ckpt if ckpt is not None and index == at.stage and at.step > 0 else None
        if resume is None:
            seed_everything(cfg.seed)
        summary["stages"][stage.name] = run_stage(
            stage,
            index,
            model,
            splits.train,
            monitor,
            cfg,
            accelerator,
            run,
            tokenizer.pad_token_id,
            spec.readout_sees_question,
            checkpoint,
            stop,
            resume,
        )
        if spec.uses_blocks and main:
            summary["stages"][stage.name]["input_share"] = spread.measure(
                accelerator.unwrap_model(model),
                spread_prompts,
                tokenizer.pad_token_id,
                spec.readout_sees_question,
            )
        # Each stage starts afresh (new optimizer and schedule), so its end is a checkpoint too.
        if cfg.train.checkpoint_every or stop.requested is not None:
            checkpoint(resumption.Position(index + 1))
        stop.check()  # a signal during the stage's last step
    accelerator.wait_for_everyone()
    if not main:
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
        splits=splits.summary(setup.task),
    )
    if spec.uses_blocks:
        stages = summary["stages"].items()
        shares = {"init": before} | {name: st["input_share"] for name, st in stages if "input_share" in st}
        metrics["input_share"] = {name: share["mean"] for name, share in shares.items()}
        metrics["input_share_by_layer"] = {name: share["by_layer"] for name, share in shares.items()}
        shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics["input_share"].items())
        logger.info(f"[{cfg.method}] input share of block-state variance (rim_lens/model/spread.py): {shown}")
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
    """metrics{suffix}.json and predictions{suffix}[_split].jsonl (test unsuffixed), written
    atomically and together: a refused write leaves all of them as they were."""
    files = {run.path / f"metrics{suffix}.json": (json.dumps(metrics, indent=2) + "\n").encode()}
    for split, records in predictions.items():
        name = f"predictions{suffix}{'' if split == 'test' else '_' + split}.jsonl"
        files[run.path / name] = "".join(json.dumps(p) + "\n" for p in records).encode()
    atomic_write_many(files)
