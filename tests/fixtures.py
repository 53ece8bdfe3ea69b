"""Tiny trained runs, shared by every test file that needs a model (imported by conftest.py).

Two families of runs, each laid out like `runs/demo/{rim,pause,direct}` (one parent directory,
each run with config.yaml, data/, model/, metrics.json, predictions.jsonl, status.json):

`tiny_runs` -- a copy task in the GSM8K line format, `pick 4 8 1||<<8=8>> #### 8` (the answer is
the middle digit; chance 0.1). A 2-layer width-64 model learns it in seconds on one thread.
    rim    trained with `memory.readout_sees_question: false`: the readout cannot attend to the
           question, so the answer can only reach it through the memory blocks (it "routes the
           answer through its blocks"; held-out accuracy about 0.9).
    pause  the ungrounded control, readout sees the question (as every pause model does). On
           this task it copies the digit straight from the question and ignores its blocks:
           knocking out every readout->block edge and mean/zero/resample-ablating all blocks
           leave its accuracy and answer log-probs unchanged (on 3 seeds x 2 step counts
           tried; test_interventions.py checks it again before relying on it as "the model
           that ignores its blocks").
    direct no blocks.
GSM8K is not a synthetic task: its questions cannot be corrupted, so activation patching needs
`tiny_modchain_runs` (the report on this family leaves its patching peak null).

`tiny_modchain_runs` -- modular chains of identity operations (`7 +0 *1 mod 10`, 1-3 of them;
the idea of dashboards/sample.py): every step's value and the answer are the start value, which
a tiny model learns quickly. Modchain is a synthetic task, so everything works on it, including
patching and the report, and its questions differ in length (padding tests). rim (readout
blind to the question, about 0.9 held-out accuracy with the seed used here) routes through its
blocks; pause and direct are trained briefly (about 0.6 and 0.8). Do not assert accuracies on
this family: such short runs on another seed can fail to learn; the copy family is the robust one.

The runs are trained once per test session (a file lock shares them between pytest-xdist
workers) and must be treated as READ-ONLY: tests that write analyses copy them first with
`clone_runs(runs, tmp_path)` (or use the `*_copy` fixtures), so workers never write into the
same run directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

COPY_METHODS = {
    # name: (method, memory overrides, steps)
    "rim": ("rim", {"readout_sees_question": False}, 200),
    "pause": ("pause", {}, 100),
    "direct": ("direct", {}, 100),
}
MODCHAIN_OPTIONS = {"min_length": 1, "max_length": 3, "modulus": 10}
IDENTITY_OPS = ("+0", "-0", "*1")
MODCHAIN_METHODS = {
    "rim": ("rim", {"readout_sees_question": False}, 120),
    "pause": ("pause", {}, 60),
    "direct": ("direct", {}, 60),
}


def copy_lines(n: int = 300, seed: int = 0) -> list[str]:
    """The copy task in GSM8K line format: answer the middle one of three digits."""
    rng = random.Random(seed)
    lines = []
    for q in rng.sample(range(1000), n):
        a, b, c = f"{q:03d}"
        lines.append(f"pick {a} {b} {c}||<<{b}={b}>> #### {b}")
    return lines


def _config(method: str, memory: dict, steps: int, task: dict, data: dict):
    from training.config import load_config

    return load_config(
        None,
        {
            "method": method,
            "task": task,
            "data": data,
            "model": {"arch": "gpt2", "preset": "tiny", "max_positions": 64},
            "memory": {"K": 2, "M": 1, **memory},
            "train": {
                "steps": steps,
                "batch_size": 32,
                "lr": 0.003,
                "threads": 1,
                "log_every": 10,
                "eval_every": max(steps, 1),
                "stage1_fraction": 0.7,
                "stage2_lr": 0.001,
                "warmup": 0.0,
                # The accuracies quoted above were measured with uniform batches.
                "length_bucketing": False,
            },
            "eval": {"latency_examples": 1},
        },
    )


def train_copy_runs(root: Path) -> dict[str, Path]:
    """Train the `tiny_runs` family into root/{rim,pause,direct} (about 10 s on one thread)."""
    from training.trainer import train

    lines = copy_lines()
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.txt").write_text("\n".join(lines[:250]) + "\n")
    (root / "data" / "eval.txt").write_text("\n".join(lines[250:]) + "\n")
    # Validation: 20 questions held out of the training file.
    data = {"train": str(root / "data" / "train.txt"), "val": 20, "test": str(root / "data" / "eval.txt")}
    runs = {}
    for name, (method, memory, steps) in COPY_METHODS.items():
        train(_config(method, memory, steps, {"name": "gsm8k"}, data), root / name, overwrite=True)
        runs[name] = root / name
    return runs


def identity_chains(n_eval: int = 60, seed: int = 0) -> tuple[list, list]:
    """(train, eval) examples: every modchain question of 1-3 identity operations (390), shuffled."""
    import itertools
    from dataclasses import replace

    from rim_lens.data.tasks import get_task

    task = get_task("modchain", **MODCHAIN_OPTIONS)
    questions = [
        " ".join([str(a), *ops, "mod", "10"])
        for n in (1, 2, 3)
        for a in range(10)
        for ops in itertools.product(IDENTITY_OPS, repeat=n)
    ]
    random.Random(seed).shuffle(questions)
    examples = [replace(task.parse_question(q), id=f"chain-{i}") for i, q in enumerate(questions)]
    return examples[n_eval:], examples[:n_eval]


def train_modchain_runs(root: Path) -> dict[str, Path]:
    """Train the `tiny_modchain_runs` family into root/{rim,pause,direct} (about 10 s)."""
    from rim_lens.data import write_examples
    from training.trainer import train

    train_set, eval_set = identity_chains()
    write_examples(root / "data" / "train.jsonl", train_set[20:])
    write_examples(root / "data" / "val.jsonl", train_set[:20])
    write_examples(root / "data" / "eval.jsonl", eval_set)
    data = {name: str(root / "data" / f"{name}.jsonl") for name in ("train", "val")}
    data["test"] = str(root / "data" / "eval.jsonl")
    task = {"name": "modchain", "options": MODCHAIN_OPTIONS}
    runs = {}
    for name, (method, memory, steps) in MODCHAIN_METHODS.items():
        train(_config(method, memory, steps, task, data), root / name, overwrite=True)
        runs[name] = root / name
    return runs


def random_checkpoint(
    directory: Path,
    arch: str = "gpt2",
    seed: int = 0,
    std: float = 0.1,
    task_options: dict | None = None,
    **spec,
) -> Path:
    """An untrained tiny checkpoint (rim-lens layout: model, tokenizer, memory spec) for the
    modchain task, every weight drawn N(0, std) and norm weights 1 + N(0, std): larger than the
    default init, so hidden states and logits are far from zero and every position matters."""
    import torch

    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import build_model, save_checkpoint
    from rim_lens.model.memory import MemorySpec
    from rim_lens.model.tokenizer import build_word_tokenizer

    task = get_task("modchain", **(task_options or MODCHAIN_OPTIONS))
    spec = MemorySpec(**{"method": "rim", "K": 2, "M": 1, "task": "modchain", **spec})
    texts = [t for ex in task.generate(64, seed=seed) for t in (ex.question, ex.answer, *ex.steps)]
    tok = build_word_tokenizer(texts + [str(d) for d in range(10)], spec)
    model = build_model(tok, arch, "tiny", max_positions=64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if ("ln" in name or "norm" in name) and name.endswith("weight") else noise)
    return save_checkpoint(model, tok, spec, directory)


# An untrained Coconut checkpoint's setting: chains of 1-4 steps (questions of different lengths,
# so batches have padded rows) and 3 continuous thoughts.
COCONUT_CHAIN_OPTIONS = {"min_length": 1, "max_length": 4, "modulus": 10}
COCONUT_THOUGHTS = 3


def random_coconut(directory: Path, arch: str):
    """(model, tokenizer, spec, task) of an untrained Coconut `random_checkpoint` with
    `COCONUT_THOUGHTS` thoughts on modchain chains of `COCONUT_CHAIN_OPTIONS`."""
    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint

    path = random_checkpoint(
        directory, arch=arch, method="coconut", thoughts=COCONUT_THOUGHTS, task_options=COCONUT_CHAIN_OPTIONS
    )
    return (*load_checkpoint(path), get_task("modchain", **COCONUT_CHAIN_OPTIONS))


def clone_runs(runs: dict[str, Path], dest: Path) -> dict[str, Path]:
    """A writable copy of (some of) a family of runs under `dest`, in the same parent layout:
    the runs in `runs` and what else the parent holds (data/), but no other run."""
    parent = next(iter(runs.values())).parent
    keep = {path.name for path in runs.values()}

    def ignore(directory: str, entries: list[str]) -> set[str]:
        skip = {e for e in entries if e.endswith(".lock")}
        if Path(directory) == parent:
            skip |= {e for e in entries if (parent / e / "config.yaml").exists() and e not in keep}
        return skip

    target = Path(dest) / parent.name
    shutil.copytree(parent, target, dirs_exist_ok=True, ignore=ignore)
    return {name: target / path.name for name, path in runs.items()}


def _shared_root(tmp_path_factory) -> Path:
    """A directory shared by all xdist workers of this session (the session's own otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(tmp_path_factory, name: str, build) -> dict[str, Path]:
    """Run `build(root)` once per session, whichever worker gets here first; the others wait.
    `build` returns the paths it made, by name."""
    import torch
    from filelock import FileLock

    root = _shared_root(tmp_path_factory) / name
    done = root / "done.json"
    with FileLock(str(root) + ".lock"):
        if not done.exists():
            threads, quiet = torch.get_num_threads(), os.environ.get("TQDM_DISABLE")
            try:
                torch.set_num_threads(1)
                os.environ["TQDM_DISABLE"] = "1"  # no progress bars in captured test output
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                runs = build(root)
            finally:
                torch.set_num_threads(threads)
                if quiet is None:
                    os.environ.pop("TQDM_DISABLE", None)
                else:
                    os.environ["TQDM_DISABLE"] = quiet
            done.write_text(json.dumps({k: str(v) for k, v in runs.items()}))
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """{"rim", "pause", "direct"}: run directories of the copy task (see module docstring).
    Read-only; copy with `clone_runs` before writing analyses."""
    return once_per_session(tmp_path_factory, "tiny_runs", train_copy_runs)


@pytest.fixture(scope="session")
def tiny_modchain_runs(tmp_path_factory) -> dict[str, Path]:
    """{"rim", "pause", "direct"}: variable-length modchain runs (synthetic: patching works).
    Read-only; copy with `clone_runs` before writing analyses."""
    return once_per_session(tmp_path_factory, "tiny_modchain_runs", train_modchain_runs)


@pytest.fixture
def tiny_runs_copy(tiny_runs, tmp_path) -> dict[str, Path]:
    """A writable per-test copy of `tiny_runs`."""
    return clone_runs(tiny_runs, tmp_path)


@pytest.fixture
def tiny_modchain_runs_copy(tiny_modchain_runs, tmp_path) -> dict[str, Path]:
    """A writable per-test copy of `tiny_modchain_runs`."""
    return clone_runs(tiny_modchain_runs, tmp_path)
