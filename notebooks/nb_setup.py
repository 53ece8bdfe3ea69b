"""The runs notebooks 02 and 03 analyse, shared so that neither copies it.

`runs()` returns (RiM, its pause control, the direct baseline): the runs named by
`RIM_LENS_NB_RUN` (e.g. runs/demo/rim after `make demo`, with its sibling pause and direct runs),
or else `RUNS/<method>`, trained with `TINY` unless a completed run is already there.
`01_train_rim.ipynb` trains the same setting into the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

torch.set_num_threads(1)  # small and polite on a shared 2-core machine

# The repository root (a notebook usually runs in notebooks/); relative paths are taken from it.
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "pyproject.toml").exists()), Path.cwd())
RUNS = ROOT / os.environ.get("RIM_LENS_NB_RUNS", "runs/notebooks")
N = int(os.environ.get("RIM_LENS_NB_N", "120"))  # held-out examples to analyse

# The tiny setting of 01_train_rim.ipynb, in the paper's setting (the answer sees the question):
# 2x2-digit multiplication, a 2-layer width-64 GPT-2 trained from scratch for 400 steps of batch 32.
TINY = [
    "task.name=mult", "task.options={n: 2}", "data.train=2000", "data.val=100", "data.test=200",
    "data.seed=1234", "model.preset=tiny", "memory.K=4",
    "train.steps=400", "train.batch_size=32", "train.lr=3e-3", "train.threads=1", "train.eval_every=40",
    "eval.latency_examples=5", "eval.max_new_tokens=16",
]  # fmt: skip


def trained(method: str) -> Path:
    """RUNS/<method>, trained with TINY unless a completed run is already there."""
    from rim_lens.runs import Run
    from training.config import load_config
    from training.trainer import train

    run = Run(RUNS / method)
    if run.status().get("status") != "completed":
        train(load_config(None, TINY + [f"method={method}"]), run.path, overwrite=True)
    return run.path


def runs(direct: bool = True) -> tuple[Path, Path | None, Path | None]:
    """(RiM run, pause control, direct baseline or None if not `direct`), printing which they are
    and RiM's accuracy."""
    from rim_lens.analysis.report import sibling
    from rim_lens.runs import Run

    named = os.environ.get("RIM_LENS_NB_RUN")  # e.g. runs/demo/rim after `make demo`
    if named:
        rim = ROOT / named
        control = sibling(rim, "pause")
        baseline = sibling(rim, "direct") if direct else None
    else:
        rim, control = trained("rim"), trained("pause")
        baseline = trained("direct") if direct else None
    print(f"RiM run: {rim}\ncontrol: {control}" + (f"\ndirect:  {baseline}" if direct else ""))
    print("held-out accuracy of the RiM run:", Run(rim).read_json("metrics.json")["accuracy"])
    return rim, control, baseline
