"""Benchmark: SmolLM2-135M + LoRA on GSM8K, seconds and peak memory of every stage, before and
after issue 10's memory work; and the cost model behind `make gsm8k`.

    python bench/pretrained.py [--recipe training/recipes/gsm8k_lora.yaml] [--set KEY=VALUE ...]

Stages, each in its own subprocess so that its peak resident set size (RSS) is its own:
- train: optimizer steps of RiM's grounding stage (its longest sequences) at the recipe's batch 16,
  through the trainer's own `run_stage`; s/step is the median over the steps after the first.
- held_out: the held-out check run at the end of every stage (teacher-forced readouts of up to
  256 validation examples).
- eval: greedy decoding of test examples as `evaluate` runs it (RiM: a readout after each of the
  K blocks, K decodes; CoT: the whole chain).
- capture: every layer's block states through the hf backend's `run`, in chunks.
- cost: FLOPs and kernel launches per token, counted on small batches, for `make gsm8k`'s estimate.

Variants:
- after: this code. Logits only at target positions, length-bucketed batches, the recipe's
  gradient checkpointing, the held-out check in chunks of eval.batch_size, prefill logits at the
  last position only, max_new_tokens derived from the data.
- before: main at 0515367, reproduced by patching this code: logits at every position, uniform
  random batches, no checkpointing, the held-out check in one batch, prefill logits at every
  position, max_new_tokens 24.

The variants alternate (before, after) stage by stage. A watchdog ends a worker whose RSS passes
--rss-limit-gb, so a 'before' stage cannot exhaust a shared machine: its row then says it was
stopped above the limit. Writes bench/results/pretrained.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
GB = 1024**3
STOPPED = 3  # exit code of a worker the watchdog ended

# The GPU run of `make gsm8k` (keep in step with the Makefile's GSM8K_SET).
GPU_PLAN = {"batch_size": 128, "steps": 450, "eval_batch_size": 128}
# Assumptions that turn counted FLOPs and kernel launches into time on one modern GPU (H100 class):
# an effective bf16 matmul throughput far below the 989 TFLOP/s dense peak, because a 135M model's
# matmuls are small, fp32 for evaluation (the saved model is fp32), and eager PyTorch's per-kernel
# launch cost. The estimate is good to about a factor of two.
GPU_ASSUMPTIONS = {"train_flops_per_s": 150e12, "eval_flops_per_s": 30e12, "launch_s": 10e-6}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(REPO / "training" / "recipes" / "gsm8k_lora.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per train stage (first is warm-up)")
    p.add_argument("--eval-n", type=int, default=32, help="test examples decoded in the eval stage")
    p.add_argument("--capture-n", type=int, default=64, help="examples captured in the capture stage")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-limit-gb", type=float, default=14.0)
    p.add_argument(
        "--stages",
        default="train,held_out,eval,capture,cost",
        help="comma-separated subset of train,held_out,eval,capture,cost",
    )
    p.add_argument("--variants", default="before,after")
    p.add_argument("--out", default=str(HERE / "results" / "pretrained.json"))
    p.add_argument("--worker", nargs=2, metavar=("STAGE", "VARIANT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- memory ----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Watchdog:
    """Samples this process's RSS; past `limit` bytes it reports and ends the process."""

    def __init__(self, limit: float, every: float = 0.02):
        self.limit, self.every, self.peak = limit, every, rss_bytes()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                print(json.dumps({"stopped": True, "rss_gb": rss / GB}), flush=True)
                os._exit(STOPPED)
            time.sleep(self.every)


def peak_rss_gb() -> float:
    """Lifetime peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


# -- 'before': main's behaviour, reproduced --------------------------------------------------------
def legacy_loss(model, batch, weights):
    """main's `_loss`: logits at every position, cross-entropy over all of them."""
    import torch.nn.functional as F

    logits = model(**batch.model_inputs(), use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="none")
    return (ce.view_as(weights) * weights).sum() / weights.sum().clamp_min(1e-8)


def full_prefill(model):
    """`model` with `logits_to_keep` dropped: prefill logits at every position, as main decoded."""
    import torch

    class FullLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            kwargs.pop("logits_to_keep", None)
            return self.inner(**kwargs)

    return FullLogits()


# -- workers ---------------------------------------------------------------------------------------
def setup(args, variant: str, lora: bool, extra: tuple[str, ...] = ()):
    """(cfg, task, splits, spec, builder, model, tokenizer) for the recipe, as the trainer builds them."""
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.data.tasks import get_task
    from rim_lens.model.layouts import SequenceBuilder
    from training.config import load_config
    from training.trainer import all_texts, load_data, make_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + [f"train.threads={args.threads}"]
    if variant == "before":
        overrides += ["train.length_bucketing=false", "train.gradient_checkpointing=false"]
    if not lora:
        overrides += ["model.lora=null", "train.gradient_checkpointing=false"]
    cfg = load_config(args.recipe, overrides + list(extra))
    task = get_task(cfg.task.name, **cfg.task.options)
    splits = load_data(cfg, task)
    spec = cfg.memory.replace(method="rim", task=task.name)
    model, tokenizer = make_model(cfg, spec, all_texts(splits.train))
    builder = SequenceBuilder(tokenizer, spec, task.join_steps)
    return cfg, task, splits, spec, builder, model, tokenizer


def work_train(args, variant: str) -> dict:
    from functools import partial

    from rim_lens.model.layouts import collate
    from rim_lens.runs import Run
    from training import stages
    from training.stages import Loop, StopSignals, run_stage
    from training.trainer import make_accelerator, plan_stages

    cfg, task, splits, spec, builder, model, tok = setup(args, variant, lora=True)
    if variant == "before":
        stages._loss = legacy_loss
    cfg.train.log_every, cfg.train.eval_every = 1, 10**9
    stage = next(s for s in plan_stages(cfg, builder) if s.name == "grounding")
    stage.steps = args.steps
    accelerator = make_accelerator(cfg.train.precision)
    model = accelerator.prepare(model)
    loaded = rss_bytes() / GB
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp))
        batches = partial(collate, pad_id=tok.pad_token_id, sees_question=spec.readout_sees_question)
        loop = Loop(cfg, model, accelerator, run, splits.train, [], batches, lambda *a: None, StopSignals())
        run_stage(loop, stage, 0)
        log = [r for r in run.read_log() if "elapsed_s" in r]
    ends = [r["elapsed_s"] for r in log]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return {
        "method": "rim",
        "training_stage": "grounding",
        "batch_size": cfg.train.batch_size,
        "lora_r": cfg.model.lora["r"],
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "length_bucketing": cfg.train.length_bucketing,
        "s_per_step": statistics.median(steps) if steps else None,
        "step_s": [ends[0]] + steps,
        "tokens_per_step": log[-1]["tokens_seen"] / len(log),
        "rss_after_load_gb": loaded,
    }


def work_held_out(args, variant: str) -> dict:
    from functools import partial

    import torch

    from rim_lens.model.layouts import collate
    from training.stages import held_out_accuracy, readout_hits
    from training.trainer import plan_stages

    cfg, task, splits, spec, builder, model, tok = setup(args, variant, lora=True)
    stage = next(s for s in plan_stages(cfg, builder) if s.name == "grounding")
    layouts = [stage.layout(ex) for ex in splits.val[:256]]
    batches = partial(collate, pad_id=tok.pad_token_id, sees_question=True)
    loaded = rss_bytes() / GB
    start = time.perf_counter()
    if variant == "before":
        model.eval()
        with torch.no_grad():
            batch = batches(layouts)
            predicted = model(**batch.model_inputs(), use_cache=False).logits.argmax(-1)
        hits = readout_hits(predicted, batch, stage.name)
        acc = {k: sum(v) / len(v) for k, v in hits.items()}
    else:
        acc = held_out_accuracy(model, layouts, stage.name, batches, "cpu", cfg.eval.batch_size)
    return {
        "examples": len(layouts),
        "chunk": len(layouts) if variant == "before" else cfg.eval.batch_size,
        "seconds": time.perf_counter() - start,
        "readout_accuracy_answer": acc.get("answer"),
        "rss_after_load_gb": loaded,
    }


def work_eval(args, variant: str, method: str) -> dict:
    from rim_lens.evaluation import evaluate
    from training.trainer import resolve_max_new_tokens

    cfg, task, splits, spec, builder, model, tok = setup(args, variant, lora=False)
    spec = spec.replace(method=method, K=spec.K if method == "rim" else 0)
    budget = 24 if variant == "before" else resolve_max_new_tokens(cfg, tok, spec, splits.train + splits.val)
    examples = splits.test[: args.eval_n]
    runner = full_prefill(model) if variant == "before" else model
    loaded = rss_bytes() / GB
    start = time.perf_counter()
    metrics, _ = evaluate(
        runner,
        tok,
        spec,
        examples,
        task_options=cfg.task.options,
        batch_size=cfg.eval.batch_size,
        latency_examples=0,
        max_new_tokens=budget,
    )
    return {
        "method": method,
        "examples": len(examples),
        "batch_size": cfg.eval.batch_size,
        "max_new_tokens": budget,
        "seconds": time.perf_counter() - start,
        "answer_tokens_mean": metrics["answer_tokens_mean"],
        "note": "base model with untrained memory tokens: answers are meaningless; each readout decodes "
        "until the end token or max_new_tokens",
        "rss_after_load_gb": loaded,
    }


def work_capture(args, variant: str) -> dict:
    import torch

    from rim_lens.analysis.backends import make_backend
    from rim_lens.model.layouts import block_positions, collate

    cfg, task, splits, spec, builder, model, tok = setup(args, variant, lora=False)
    model.eval()
    backend = make_backend("hf", model, tok)
    layers = list(range(backend.n_layers + 1))
    examples = splits.test[: args.capture_n]
    loaded = rss_bytes() / GB
    start, states = time.perf_counter(), []
    for i in range(0, len(examples), cfg.eval.batch_size):
        prompts = [builder.prompt(ex) for ex in examples[i : i + cfg.eval.batch_size]]
        batch = collate(prompts, tok.pad_token_id, spec.readout_sees_question, side="left")
        out = backend.run(batch, capture=layers)
        pos = block_positions(batch)  # [B, K, M + 2]
        rows = torch.arange(pos.shape[0])[:, None, None]
        states.append(torch.stack([out.resid[l][rows, pos] for l in layers], 1))
        del out
    kept = torch.cat(states)
    return {
        "examples": len(examples),
        "chunk": cfg.eval.batch_size,
        "layers": len(layers),
        "states_shape": list(kept.shape),
        "states_gb": kept.numel() * kept.element_size() / GB,
        "seconds": time.perf_counter() - start,
        "rss_after_load_gb": loaded,
    }


class OpCounter:
    """Counts ATen operator calls: on a GPU each is (at least) one kernel launch."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def work_cost(args, variant: str) -> dict:
    """Per layout: FLOPs per padded token and kernel launches per step, counted on one small batch
    (training: forward + backward, as the GPU run trains: no checkpointing); per decode step; and
    the padded tokens per step of the GPU plan's batches (length-bucketed)."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from rim_lens.evaluation import decode_budget
    from rim_lens.model.decoding import greedy_decode
    from rim_lens.model.layouts import collate
    from training.sampling import LengthBuckets
    from training.stages import _loss

    # As the GPU plan trains: without gradient checkpointing.
    cfg, task, splits, spec, builder, model, tok = setup(
        args, variant, lora=True, extra=("train.gradient_checkpointing=false",)
    )
    model.train()
    layouts = {
        "direct": builder.direct,
        "cot": builder.cot,
        "pause": builder.refinement,
        "rim:grounding": builder.grounding,
        "rim:refinement": builder.refinement,
    }
    sample = splits.train[:4]
    out: dict = {"layouts": {}, "gpu_plan": GPU_PLAN, "assumptions": GPU_ASSUMPTIONS}
    for name, lay in layouts.items():
        seqs = [lay(ex) for ex in sample]
        batch = collate(seqs, tok.pad_token_id, True)
        weights = (batch.target_index > 0).float()
        with FlopCounterMode(display=False) as flops, OpCounter() as ops:
            _loss(model, batch, weights).backward()
        model.zero_grad(set_to_none=True)
        lengths = [len(lay(ex)) for ex in splits.train]
        sampler = LengthBuckets(lengths, GPU_PLAN["batch_size"], seed=cfg.seed, drop_last=True)
        padded = [max(lengths[i] for i in b) * len(b) for b in sampler.batches(0)]
        out["layouts"][name] = {
            "train_flops_per_padded_token": flops.get_total_flops() / batch.input_ids.numel(),
            "train_launches_per_step": ops.ops,
            "padded_tokens_per_step": float(np.mean(padded)),
            "real_tokens_per_step": float(np.mean(lengths)) * GPU_PLAN["batch_size"],
        }
    # Decoding: one prefill + one decode step at the eval batch, on the merged (plain) model.
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    plain.eval()
    for method in ("direct", "cot", "pause", "rim"):
        mspec = spec.replace(method=method, K=spec.K if method in ("rim", "pause") else 0)
        mbuilder = type(builder)(tok, mspec, task.join_steps)
        prompts = [mbuilder.prompt(ex) for ex in sample]
        with FlopCounterMode(display=False) as flops, OpCounter() as ops:
            greedy_decode(plain, prompts, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=2)
        prompt_tokens = collate(prompts, tok.pad_token_id).input_ids.numel()
        out.setdefault("decode", {})[method] = {
            "flops_two_steps": flops.get_total_flops(),
            "launches_two_steps": ops.ops,
            "prompt_tokens_per_example": float(np.mean([len(mbuilder.prompt(ex)) for ex in splits.val])),
            "prompt_tokens_counted": prompt_tokens,
            "max_new_tokens": decode_budget(mbuilder, splits.train + splits.val),
        }
    out["n_val"], out["n_test"], out["K"] = len(splits.val), len(splits.test), spec.K
    out["latency_examples"] = cfg.eval.latency_examples
    out["parameters"] = sum(p.numel() for p in plain.parameters())
    return out


def worker(args) -> dict:
    stage, variant = args.worker
    Watchdog(args.rss_limit_gb * GB)
    start = time.perf_counter()
    if stage == "train":
        result = work_train(args, variant)
    elif stage == "held_out":
        result = work_held_out(args, variant)
    elif stage.startswith("eval:"):
        result = work_eval(args, variant, stage.split(":")[1])
    elif stage == "capture":
        result = work_capture(args, variant)
    else:
        result = work_cost(args, variant)
    wall = time.perf_counter() - start
    return {"stage": stage, "variant": variant, **result, "peak_rss_gb": peak_rss_gb(), "wall_s": wall}


# -- the estimate for `make gsm8k` -----------------------------------------------------------------
def gpu_estimate(cost: dict) -> dict:
    """Minutes per method on one GPU: training steps from FLOPs and launches per step, then
    evaluation (validation and test, K readouts for RiM and pause, latency examples at batch 1)."""
    a, plan, lay = cost["assumptions"], cost["gpu_plan"], cost["layouts"]

    def step_s(name: str) -> float:
        x = lay[name]
        flops = x["train_flops_per_padded_token"] * x["padded_tokens_per_step"]
        return flops / a["train_flops_per_s"] + x["train_launches_per_step"] * a["launch_s"]

    stage1 = round(plan["steps"] * 0.75)
    train = {
        "direct": plan["steps"] * step_s("direct"),
        "cot": plan["steps"] * step_s("cot"),
        "pause": plan["steps"] * step_s("pause"),
        "rim": stage1 * step_s("rim:grounding") + (plan["steps"] - stage1) * step_s("rim:refinement"),
    }
    out = {}
    for method, d in cost["decode"].items():
        per_step_launch = d["launches_two_steps"] / 2  # prefill and one decode step, about equal
        flops_per_token = d["flops_two_steps"] / max(d["prompt_tokens_counted"], 1)
        n = cost["n_val"] + cost["n_test"]
        decodes = cost["K"] if method in ("rim", "pause") else 1  # a readout after every block
        chunks = -(-n // plan["eval_batch_size"]) * decodes
        steps = chunks * (1 + d["max_new_tokens"]) + (cost["latency_examples"] + 2) * (
            1 + d["max_new_tokens"]
        )
        tokens = n * decodes * (d["prompt_tokens_per_example"] + d["max_new_tokens"])
        eval_s = steps * per_step_launch * a["launch_s"] + tokens * flops_per_token / a["eval_flops_per_s"]
        out[method] = {
            "train_min": train[method] / 60,
            "eval_min": eval_s / 60,
            "total_min": (train[method] + eval_s) / 60,
        }
    out["all_methods_min"] = sum(v["total_min"] for v in out.values())
    return out


# -- driver ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    stages = [s for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    plan = []
    for stage in stages:
        if stage == "eval":
            plan += [("eval:rim", v) for v in variants] + [("eval:cot", "after")]
        elif stage in ("capture", "cost"):
            plan.append((stage, "after"))  # the same code before and after this work
        else:
            plan += [(stage, v) for v in variants]
    results, load = [], [os.getloadavg()[0]]
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    for stage, variant in plan:
        cmd = [sys.executable, __file__, "--worker", stage, variant, "--recipe", args.recipe]
        cmd += [f"--set={o}" for o in args.overrides]
        cmd += ["--steps", str(args.steps), "--eval-n", str(args.eval_n), "--capture-n", str(args.capture_n)]
        cmd += ["--threads", str(args.threads), "--rss-limit-gb", str(args.rss_limit_gb)]
        print(f"[{stage} / {variant}] ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == STOPPED:
            result = {
                "stage": stage,
                "variant": variant,
                **json.loads(lines[-1]),
                "limit_gb": args.rss_limit_gb,
            }
        elif proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            result = {"stage": stage, "variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            result = json.loads(lines[-1])
        load.append(os.getloadavg()[0])
        print(json.dumps({k: v for k, v in result.items() if k != "step_s"}), flush=True)
        results.append(result)

    import torch

    summary = {
        "recipe": os.path.relpath(args.recipe, REPO),
        "overrides": args.overrides,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "load_average": load,
        "notes": [
            "before = main at 0515367 reproduced by patching (full logits, uniform batches, no "
            "checkpointing, one-batch held-out check, full prefill logits, max_new_tokens 24)",
            "peak_rss_gb: the worker's lifetime peak (model load included), from getrusage",
            "a shared 2-core machine: timings are noisy",
        ],
        "results": results,
    }
    cost = next((r for r in results if r["stage"] == "cost" and "layouts" in r), None)
    if cost:
        summary["gsm8k_gpu_estimate"] = gpu_estimate(cost)
        print(json.dumps(summary["gsm8k_gpu_estimate"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
