"""One stage of training, top to bottom: its loss, its held-out check, stopping, and its loop.

A run trains its method's stages (`Method.stages`) one after the other through `run_stage`, each
with a fresh optimizer and LR schedule; `trainer` sets the run up, resumes it and scores it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from rim_lens.data import Example
from rim_lens.errors import RunError
from rim_lens.methods import Stage
from rim_lens.model.checkpoints import set_dropout
from rim_lens.model.coconut import thought_forward
from rim_lens.model.layouts import IGNORE, Batch, Layout
from rim_lens.progress import Progress, logger
from rim_lens.runs import (
    Run,
)
from training import resume as resumption
from training.config import RunConfig
from training.sampling import LengthBuckets

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


def stage_logits(stage: Stage) -> Logits:
    """How `stage` computes logits at the target positions: one pass, or the thought passes."""
    return coconut_logits if stage.thought_passes else target_logits


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


@dataclass
class Loop:
    """What every stage of a run trains with: the recipe, the prepared model and accelerator, the
    run it logs to, its training and monitor examples, how a list of layouts becomes a batch, and
    how it checkpoints (`checkpoint(position, optimizer, scheduler, tokens, elapsed, accuracy)`)
    and stops."""

    cfg: RunConfig
    model: Any
    accelerator: Accelerator
    run: Run
    train_set: list[Example]
    monitor: list[Example]
    batches: Callable[[list[Layout]], Batch]
    checkpoint: Save
    stop: StopSignals


def _loader(loop: Loop, stage: Stage, order: torch.Generator) -> DataLoader:
    """The stage's training batches, shuffled by `order` (reseeded per epoch, see training/resume.py)."""
    t = loop.cfg.train
    layouts = [stage.layout(ex) for ex in loop.train_set]
    drop_last = len(layouts) >= t.batch_size
    if t.length_bucketing:
        sampler = LengthBuckets([len(x) for x in layouts], t.batch_size, drop_last=drop_last, generator=order)
        # `generator` too: the loader draws a base seed each epoch, which must not come from the
        # global RNG (dropout's), or a resumed run would draw it at a different point.
        return DataLoader(layouts, batch_sampler=sampler, collate_fn=loop.batches, generator=order)
    return DataLoader(
        layouts,
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=drop_last,
        collate_fn=loop.batches,
        generator=order,
    )


def _optimizer(loop: Loop, stage: Stage) -> tuple[list, torch.optim.Optimizer, Any]:
    """The trained parameters, a fresh AdamW at the stage's LR and its warm-up schedule."""
    t = loop.cfg.train
    params = [p for p in loop.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=t.weight_decay)
    warmup = int(t.warmup * stage.steps)
    if t.lr_schedule == "cosine":
        schedule = get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps=stage.steps)
    else:
        schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    return params, optimizer, schedule


def _grad_norm(accelerator: Accelerator, params: list, clip: float | None) -> torch.Tensor:
    """The gradient norm, after clipping it to `clip` (if set)."""
    if clip:
        return accelerator.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _monitor(loop: Loop, stage: Stage, layouts: list[Layout], step: int) -> dict[str, float]:
    """The stage's held-out readout accuracy at `step`, logged."""
    a = loop.accelerator
    logits = stage_logits(stage)
    acc = held_out_accuracy(
        loop.model, layouts, stage.name, loop.batches, a.device, loop.cfg.eval.batch_size, logits
    )
    if a.is_main_process:
        loop.run.log({"stage": stage.name, "step": step, "readout_accuracy": acc})
    return acc


def _starting_point(
    index: int, resume: resumption.Checkpoint | None, optimizer, scheduler
) -> tuple[resumption.Position, int, float, dict[str, float]]:
    """Where the `index`-th stage starts: its position, tokens seen, seconds trained and monitor
    accuracy, all from `resume` (whose optimizer and schedule states it restores) if given."""
    if resume is None:
        return resumption.Position(index), 0, 0.0, {}
    resume.restore_training(optimizer, scheduler)
    s = resume.state
    return s.position, s.tokens, s.elapsed_s, s.readout_accuracy


def _progress(loop: Loop, stage: Stage, step: int) -> Progress:
    """The stage's progress bar, from `step`."""
    # `disable` is left to tqdm on the main process, so TQDM_DISABLE=1 silences the bar.
    quiet = {} if loop.accelerator.is_main_process else {"disable": True}
    return Progress(
        total=stage.steps, initial=step, desc=f"{loop.cfg.method}:{stage.name}", unit="step", **quiet
    )


def _log_loss(loop: Loop, stage: Stage, step: int, loss: float, lr: float, start: float, tokens: int) -> None:
    """Log the loss and learning rate at `step` to the run, with the time since `start` (on the
    `time.perf_counter` clock) and the tokens seen so far."""
    record = {"stage": stage.name, "step": step, "loss": loss, "lr": lr}
    loop.run.log(record | {"elapsed_s": time.perf_counter() - start, "tokens_seen": tokens})


def _postfix(loss: float, acc: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows after a monitored step: the loss and the first four accuracies."""
    return {"loss": f"{loss:.4f}", **{k: f"{v:.2f}" for k, v in list(acc.items())[:4]}}


def _log_end(loop: Loop, stage: Stage, steps: int, took: float, acc: dict[str, float]) -> None:
    """Say how the stage ended: its steps, time and held-out readout accuracy (main process only)."""
    if loop.accelerator.is_main_process:
        shown = "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        what = f"[{loop.cfg.method}] {stage.name}: {steps} steps in {took:.0f}s"
        logger.info(f"{what}; held-out readout accuracy: {shown}")


def run_stage(
    loop: Loop, stage: Stage, index: int, resume: resumption.Checkpoint | None = None
) -> dict[str, float]:
    """Train one stage (the `index`-th of the run) with a fresh optimizer and LR schedule (or, from
    `resume`, the ones it had when it was checkpointed); returns its time, tokens and final
    monitor accuracy."""
    cfg, model, accelerator = loop.cfg, loop.model, loop.accelerator
    t = cfg.train
    set_dropout(model, stage.dropout)
    order = torch.Generator()
    loader = _loader(loop, stage, order)
    monitor_layouts = [(stage.held_out or stage.layout)(ex) for ex in loop.monitor]
    params, optimizer, scheduler = _optimizer(loop, stage)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    at, tokens, elapsed, acc = _starting_point(index, resume, optimizer, scheduler)
    step, epoch, consumed = at.step, at.epoch, at.batch

    def save() -> None:
        position = resumption.Position(index, step, epoch, consumed)
        loop.checkpoint(position, optimizer, scheduler, tokens, time.perf_counter() - start, acc)

    model.train()
    bar = _progress(loop, stage, step)
    start = time.perf_counter() - elapsed
    loss_fn = partial(_loss, logits=stage_logits(stage))
    guard = FiniteGuard(stage, scaled=accelerator.scaler is not None)
    loop.stop.deferring = True
    while step < stage.steps:
        order.manual_seed(resumption.epoch_seed(cfg.seed, index, epoch))
        for batch in accelerator.skip_first_batches(loader, consumed) if consumed else loader:
            weights = stage.weights(batch, step / stage.steps)
            loss = loss_fn(model, batch, weights)
            accelerator.backward(loss)
            guard.check(step + 1, loss, _grad_norm(accelerator, params, t.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += 1
            tokens += int((batch.roles > 0).sum()) * accelerator.num_processes
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if accelerator.is_main_process and (step % t.log_every == 0 or step == stage.steps):
                _log_loss(loop, stage, step, loss.item(), scheduler.get_last_lr()[0], start, tokens)
            if step % t.eval_every == 0 or step == stage.steps:
                acc = _monitor(loop, stage, monitor_layouts, step)
                bar.set_postfix(**_postfix(loss.item(), acc))
            if step >= stage.steps:
                break
            if loop.stop.requested is not None or (t.checkpoint_every and step % t.checkpoint_every == 0):
                save()
                loop.stop.check()
        else:
            epoch, consumed = epoch + 1, 0
    loop.stop.deferring = False
    bar.close()
    took = time.perf_counter() - start
    _log_end(loop, stage, step, took, acc)
    return {"time_s": took, "tokens_seen": tokens, "readout_accuracy": acc}
