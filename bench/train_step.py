"""Training throughput per core of every method, this code against a reference commit, side by side.

    python bench/train_step.py [--recipe training/recipes/demo.yaml] [--ref 4d55f21] [--rounds 12] [--compile]

Each variant is a worker process holding its own checkout: `head` (this working tree) and `ref`
(the `--ref` commit, checked out into a temporary git worktree). Every worker builds each method's
model and stages from the recipe exactly as `rim-lens train` does (`plan_stages`) and times its own
training step on the same batches of the recipe's training set: the loss (one forward pass at
the recipe's batch size), backward, gradient clipping and AdamW. Both compute their trainer's loss
(`_loss`); with `--compile`, head's goes through torch.compile: a measurement of what compiling
would give, since training does not compile (inductor's loss was wrong or aborted on some CPU
settings: docs/results.md). Rounds are interleaved: in every round each (method, stage) is stepped
by every worker in turn, in an order that rotates, so the machine's noise hits both alike; medians
are reported.
The first steps of every (worker, method, stage) are untimed warm-up (compilation with
`--compile`; head's warm-up time is reported as compile_s).

Reported per (method, stage) and per method (stages weighted by their steps in the recipe):
tokens/s per core (non-padding tokens over s/step, divided by the threads), the speed-up of head
over ref, and model FLOPs utilisation: the step's FLOPs (counted once with
torch.utils.flop_counter on the eager step: matmuls and attention, forward and backward) over
s/step, divided by this core's measured matmul peak (the best of several fp32 GEMMs at
`--threads` threads, measured before and after the rounds).

Writes bench/results/train_step.json (or --out). Absolute figures depend on the machine and its
load: run it with nothing else running; the ratios within one run are the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_RECIPE = ROOT / "training" / "recipes" / "demo.yaml"
DEFAULT_OUT = HERE / "results" / "train_step.json"
DEFAULT_REF = "4d55f21"  # main before the training-speed work (issue 21)
METHODS = ("direct", "cot", "pause", "rim")
BATCHES = 4  # distinct batches each stage cycles through


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe (default: the demo's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--ref", default=DEFAULT_REF, help="reference commit (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per stage first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--compile",
        action="store_true",
        help="head's loss through torch.compile (a measurement only: training does not compile, see "
        "docs/results.md)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: a checkout to serve
    return p.parse_args(argv)


# -- worker: one checkout's training steps, driven over stdin/stdout -------------------------------
def serve(args: argparse.Namespace) -> int:
    """Build every (method, stage) of the recipe from the checkout at `args.worker`, then answer
    `step KEY N` lines with the seconds of N training steps."""
    sys.path.insert(0, str(args.worker))
    import torch

    torch.set_num_threads(args.threads)
    from rim_lens.data.tasks import get_task
    from rim_lens.model.layouts import collate
    from training import trainer
    from training.config import load_config

    try:  # the loss's home since issue 23; the reference commit keeps it in the trainer
        from training import stages as losses

        logits_of = losses.stage_logits
    except ImportError:
        losses, logits_of = trainer, lambda stage: stage.logits

    recipe, overrides = known_keys(args.worker, Path(args.recipe), args.overrides)
    entries: dict[str, dict] = {}
    for method in args.methods.split(","):
        cfg = load_config(recipe, [*overrides, f"method={method}"])
        task = get_task(cfg.task.name, **cfg.task.options)
        splits = trainer.load_data(cfg, task)
        spec = trainer.run_spec(cfg, task)
        model, tokenizer = trainer.make_model(
            cfg, spec, trainer.all_texts(splits.train + splits.val + splits.test)
        )
        model.train()
        builder = trainer.SequenceBuilder(tokenizer, spec.replace(K=cfg.memory.K), task.join_steps)
        B = cfg.train.batch_size
        for stage in trainer.plan_stages(cfg, builder):
            batches = [
                collate(
                    [stage.layout(ex) for ex in splits.train[i * B : (i + 1) * B]],
                    tokenizer.pad_token_id,
                    spec.readout_sees_question,
                )
                for i in range(BATCHES)
            ]
            loss = lambda m, b, w, stage=stage: losses._loss(m, b, w, logits_of(stage))  # noqa: E731
            if args.compile:
                loss = torch.compile(loss)
            params = [p for p in model.parameters() if p.requires_grad]
            entries[f"{method}:{stage.name}"] = {
                "model": model,
                "params": params,
                "optimizer": torch.optim.AdamW(params, lr=stage.lr),
                "loss": loss,
                "batches": batches,
                "weights": [stage.weights(b, 0.5) for b in batches],
                "clip": cfg.train.grad_clip,
                "done": 0,
                "steps": stage.steps,
                "tokens": statistics.mean(int((b.roles > 0).sum()) for b in batches),
            }

    def step(e: dict) -> None:
        i = e["done"] % BATCHES
        e["loss"](e["model"], e["batches"][i], e["weights"][i]).backward()
        if e["clip"]:
            torch.nn.utils.clip_grad_norm_(e["params"], e["clip"])
        e["optimizer"].step()
        e["optimizer"].zero_grad(set_to_none=True)
        e["done"] += 1

    def flops(e: dict) -> int:
        """FLOPs of one eager forward and backward of the loss (what a step computes)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            losses._loss(e["model"], e["batches"][0], e["weights"][0]).backward()
        e["optimizer"].zero_grad(set_to_none=True)
        return counter.get_total_flops()

    info = {k: {"tokens": e["tokens"], "steps": e["steps"]} for k, e in entries.items()}
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        command, key, n = line.split()
        e = entries[key]
        if command == "flops":
            print(json.dumps({"flops": flops(e)}), flush=True)
            continue
        start = time.perf_counter()
        for _ in range(int(n)):
            step(e)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


def known_keys(checkout: Path, recipe: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """The recipe and overrides without the keys `checkout`'s schema does not have (a reference
    commit predates keys such as train.snapshots). A filtered recipe is written inside the checkout,
    at the recipe's place there, so relative data paths resolve as they do in this tree."""
    import dataclasses
    import typing

    import yaml

    from training.config import RunConfig

    sections = {
        name: {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
        for name, kind in typing.get_type_hints(RunConfig).items()
    }

    def known(key: str) -> bool:
        section, _, name = key.partition(".")
        fields = sections.get(section, set())
        return section in sections and (not name or fields is None or name.split(".")[0] in fields)

    raw = yaml.safe_load(recipe.read_text()) or {}
    kept = {
        k: {n: v for n, v in val.items() if known(f"{k}.{n}")}
        if isinstance(val, dict) and sections[k]
        else val
        for k, val in raw.items()
        if known(k)
    }
    kept_overrides = [o for o in overrides if known(o.partition("=")[0])]
    if kept == raw:
        return recipe, kept_overrides
    target = checkout / recipe.resolve().relative_to(ROOT)
    target = target.with_name(target.stem + ".bench.yaml")
    target.write_text(yaml.safe_dump(kept, sort_keys=False))
    return target, kept_overrides


class Worker:
    """A worker process over one checkout."""

    def __init__(self, name: str, checkout: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(checkout)]
        command += ["--recipe", args.recipe, "--methods", args.methods, "--threads", str(args.threads)]
        command += ["--compile"] if args.compile and name == "head" else []
        for item in args.overrides:
            command += ["--set", item]
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str, key: str, n: int = 1) -> dict:
        self.proc.stdin.write(f"{command} {key} {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def matmul_peak(threads: int) -> float:
    """This core's fp32 GEMM throughput (FLOP/s): the best of several square sizes."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (256, 512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(2, int(2e9 / (2 * n**3)))
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown or args.rounds < 1:
        print(f"bench/train_step.py: unknown method(s) {unknown} or --rounds < 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rim-ref-") as tmp:
        ref_dir = Path(tmp) / "ref"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_dir), args.ref],
            check=True,
            capture_output=True,
        )
        try:
            result = measure(args, ref_dir)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_dir)], check=False
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def measure(args: argparse.Namespace, ref_dir: Path) -> dict:
    import torch

    peak_before = matmul_peak(args.threads)
    workers = [Worker("ref", ref_dir, args), Worker("head", ROOT, args)]
    keys = list(workers[1].info)
    compile_s = {}
    for w in workers:
        for key in keys:
            seconds = w.ask("step", key, args.warmup)["seconds"]
            if w.name == "head":
                compile_s[key] = seconds
    flops = {key: workers[0].ask("flops", key)["flops"] for key in keys}
    times: dict[tuple[str, str], list[float]] = {(w.name, k): [] for w in workers for k in keys}
    start = time.perf_counter()
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            for w in workers if r % 2 == 0 else workers[::-1]:
                times[(w.name, key)].append(w.ask("step", key)["seconds"])
    wall = time.perf_counter() - start
    for w in workers:
        w.close()
    peak = max(peak_before, matmul_peak(args.threads))

    stages = {}
    for key in keys:
        tokens, steps = workers[1].info[key]["tokens"], workers[1].info[key]["steps"]
        row = {"tokens_per_step": tokens, "steps_in_recipe": steps, "flops_per_step": flops[key]}
        for name in ("ref", "head"):
            s = statistics.median(times[(name, key)])
            row[name] = {
                "s_per_step": s,
                "tokens_per_s_per_core": tokens / s / args.threads,
                "mfu": flops[key] / s / args.threads / peak,
            }
        row["head"]["compile_s"] = compile_s[key]
        row["speedup"] = row["ref"]["s_per_step"] / row["head"]["s_per_step"]
        stages[key] = row
    methods = {}
    for method in args.methods.split(","):
        mine = [stages[k] for k in keys if k.startswith(method + ":")]
        out = {}
        for name in ("ref", "head"):
            run_s = sum(r[name]["s_per_step"] * r["steps_in_recipe"] for r in mine)
            tokens = sum(r["tokens_per_step"] * r["steps_in_recipe"] for r in mine)
            out[name] = {"run_s": run_s, "tokens_per_s_per_core": tokens / run_s / args.threads}
        out["speedup"] = out["ref"]["run_s"] / out["head"]["run_s"]
        methods[method] = out
    ref_total = sum(m["ref"]["run_s"] for m in methods.values())
    head_total = sum(m["head"]["run_s"] for m in methods.values())

    print(
        f"Training steps at the recipe's batch, {args.threads} thread(s), medians of {args.rounds} "
        f"interleaved rounds ({wall:.0f} s); matmul peak {peak / 1e9:.0f} GFLOP/s per core; "
        f"ref {args.ref} vs head"
    )
    header = ("method:stage", "ref tok/s", "head tok/s", "speed-up", "MFU ref", "MFU head")
    print("{:<22} {:>10} {:>11} {:>9} {:>8} {:>9}".format(*header))
    for key, r in stages.items():
        ref, head = r["ref"], r["head"]
        print(
            f"{key:<22} {ref['tokens_per_s_per_core']:>10.0f} {head['tokens_per_s_per_core']:>11.0f} "
            f"{r['speedup']:>8.2f}x {ref['mfu']:>8.1%} {head['mfu']:>9.1%}"
        )
    print(f"\n{'method':<10} {'ref run s':>10} {'head run s':>11} {'speed-up':>9}")
    for method, m in methods.items():
        print(f"{method:<10} {m['ref']['run_s']:>10.0f} {m['head']['run_s']:>11.0f} {m['speedup']:>8.2f}x")
    print(f"{'all':<10} {ref_total:>10.0f} {head_total:>11.0f} {ref_total / head_total:>8.2f}x")
    return {
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "ref": args.ref,
        "threads": args.threads,
        "rounds": args.rounds,
        "matmul_peak_flops_per_core": peak,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": stages,
        "methods": methods,
        "all": {"ref_run_s": ref_total, "head_run_s": head_total, "speedup": ref_total / head_total},
    }


if __name__ == "__main__":
    sys.exit(main())
