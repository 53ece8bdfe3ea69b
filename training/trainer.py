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
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

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
from rim_lens.methods import Stage, get_method
from rim_lens.model import spread
from rim_lens.model.checkpoints import build_model, load_pretrained, save_checkpoint, set_dropout
from rim_lens.model.layouts import Layout, SequenceBuilder, collate
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer, memory_token_ids
from rim_lens.progress import logger
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
from training.stages import Diverged, Loop, StopSignals, run_stage

# train.precision -> accelerate's mixed_precision: autocast in bf16 / fp16, weights kept in fp32.
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SPREAD_EXAMPLES = 64  # validation questions the input share of block states is measured on


def plan_stages(cfg: RunConfig, builder: SequenceBuilder) -> list[Stage]:
    """The run's stages, as its method plans them (`rim_lens.methods`)."""
    return get_method(cfg.method).stages(cfg, builder)


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
    method = get_method(cfg.method)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _checkpoint(run: Run, setup: Setup) -> resumption.Checkpoint | None:
    """The run's last checkpoint, if any, checked against the data and stages it resumes with."""
    ckpt = resumption.Checkpoint.read(run.checkpoint_dir)
    if ckpt is not None and ckpt.state.data != setup.data:
        raise RunError(f"{run.path}: the recipe's data changed since this run started; {resumption.RESTART}")
    if ckpt is not None:
        ckpt.check_position([stage.steps for stage in setup.stages])
    return ckpt


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
        ckpt = _checkpoint(run, setup) if plan.resume else None
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


def _input_share(setup: Setup) -> Callable[..., dict]:
    """The input share of a model's block states (`spread.measure`), always on the same
    validation questions (the first SPREAD_EXAMPLES)."""
    prompts = [setup.builder.prompt(ex) for ex in setup.splits.val[:SPREAD_EXAMPLES]]
    pad_id, sees_question = setup.tokenizer.pad_token_id, setup.spec.readout_sees_question
    return partial(spread.measure, prompts=prompts, pad_id=pad_id, sees_question=sees_question)


def _train(
    cfg: RunConfig,
    run: Run,
    setup: Setup,
    accelerator: Accelerator,
    stop: StopSignals,
    ckpt: resumption.Checkpoint | None,
) -> dict:
    """Train the run's stages (from `ckpt`, if resuming), checkpointing as the recipe says; on the
    main process save and score the model (`_finish`). Returns the run's summary."""
    main = accelerator.is_main_process
    model, tokenizer, spec, splits = setup.model, setup.tokenizer, setup.spec, setup.splits
    at = ckpt.state.position if ckpt else resumption.Position()
    # The paper's PCA finding, measured before training and after each stage. Before: the freshly
    # built model (deterministic from the seed, so a resumed run measures the same), or the
    # pretrained base (LoRA starts as the identity).
    share = _input_share(setup)
    before = share(model) if spec.uses_blocks and main else None
    if ckpt is not None:
        ckpt.restore_model(model)
    model = accelerator.prepare(model)
    summary: dict = {"stages": dict(ckpt.state.stages) if ckpt else {}}

    def checkpoint(position, optimizer=None, scheduler=None, tokens=0, elapsed=0.0, acc=None) -> None:
        if main:
            state = resumption.TrainState(position, setup.data, tokens, elapsed, acc or {}, summary["stages"])
            unwrapped, log = accelerator.unwrap_model(model), run.file(artefacts.TRAIN_LOG)
            resumption.save(run.checkpoint_dir, unwrapped, state, log, optimizer, scheduler)
            if cfg.train.snapshots:
                done = sum(s.steps for s in setup.stages[: position.stage]) + position.step
                snapshot = run.file(artefacts.SNAPSHOTS) / artefacts.snapshot_name(done)
                save_checkpoint(unwrapped, tokenizer, spec, snapshot)

    if ckpt is None and cfg.train.checkpoint_every:
        checkpoint(resumption.Position())  # the start: what a run that diverges at once keeps
    batches = partial(collate, pad_id=tokenizer.pad_token_id, sees_question=spec.readout_sees_question)
    monitor = splits.val[: min(len(splits.val), 256)]
    loop = Loop(cfg, model, accelerator, run, splits.train, monitor, batches, checkpoint, stop)
    for index, stage in enumerate(setup.stages):
        if index < at.stage:
            continue
        resume = ckpt if ckpt is not None and index == at.stage and at.step > 0 else None
        if resume is None:
            seed_everything(cfg.seed)
        summary["stages"][stage.name] = run_stage(loop, stage, index, resume)
        if spec.uses_blocks and main:
            summary["stages"][stage.name]["input_share"] = share(accelerator.unwrap_model(model))
        # Each stage starts afresh (new optimizer and schedule), so its end is a checkpoint too.
        if cfg.train.checkpoint_every or stop.requested is not None:
            checkpoint(resumption.Position(index + 1))
        stop.check()  # a signal during the stage's last step
    accelerator.wait_for_everyone()
    if not main:
        return summary

    # Without the autocast wrapper: the saved model and its evaluation are plain fp32.
    return _finish(cfg, run, setup, accelerator.unwrap_model(model, keep_fp32_wrapper=False), summary, before)


def _finish(cfg: RunConfig, run: Run, setup: Setup, model, summary: dict, before: dict | None) -> dict:
    """Save the trained `model` (merged, if LoRA) and score it: metrics.json, predictions, the
    input share of block states before training (`before`) and after each stage."""
    tokenizer, spec, splits = setup.tokenizer, setup.spec, setup.splits
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
