"""The names of everything a run directory holds, and the command that produces each.

`runs/<name>/` holds the resolved recipe, the checkpoint, the data splits it was trained and
scored on, the training log, status, metrics, predictions and, after analyses, `analysis/`.
Every module names these files through this one place.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
MODEL = "model"
DATA = "data"
TRAIN_LOG = "train_log.jsonl"
STATUS = "status.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
SWEEP = "sweep.json"
ANALYSIS = "analysis"
# Everything needed to resume an interrupted training bit for bit; removed once the run completes.
CHECKPOINT = "checkpoint"
# With `train.snapshots`, the model at every periodic checkpoint, kept for analyses over training:
# snapshots/<global step, 6 digits>/ is a checkpoint directory like `model/`.
SNAPSHOTS = "snapshots"


def snapshot_name(step: int) -> str:
    """The folder of the snapshot taken after `step` optimizer steps (all stages counted)."""
    return f"{step:06d}"


# The data splits, disjoint by each task's canonical question key: settings are chosen on `val`,
# `test` is scored once at the end.
SPLITS = ("train", "val", "test")


def split_file(split: str) -> str:
    """The run-relative path of a data split, e.g. `data/test.jsonl`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{DATA}/{split}.jsonl"


# What produces each artefact, so a missing one can be reported with its fix.
PRODUCERS = {
    CONFIG: "rim-lens train RECIPE",
    MODEL: "rim-lens train RECIPE",
    DATA: "rim-lens train RECIPE",
    TRAIN_LOG: "rim-lens train RECIPE",
    METRICS: "rim-lens eval {run}",
    PREDICTIONS: "rim-lens eval {run}",
    SWEEP: "rim-lens eval {run} --K 1,2,4,8",
    ANALYSIS: "rim-lens analyze report {run}",
}


def split_path(run_dir: str | Path, split: str = "test") -> Path:
    """The data file of a run's split, e.g. `runs/demo/rim/data/test.jsonl`.

    Runs trained before the val/test splits hold one held-out file, `data/eval.jsonl`: it stands
    for `test` while such runs exist (the only place that knows about it).
    """
    path = Path(run_dir) / split_file(split)
    legacy = Path(run_dir) / DATA / "eval.jsonl"
    return legacy if split == "test" and not path.exists() and legacy.exists() else path


# -- analyses: `rim-lens analyze WHAT RUN` writes under `RUN/analysis/` ------------------------------
CAPTURE = "capture"  # a folder: safetensors shards, examples.jsonl, meta.json (written last)
REPORT = "report"  # report.json and report.md
CALIBRATION = "calibration.json"  # each finding's test on planted models (`rim-lens analyze calibrate`)
# How `rim-lens analyze patch --method` patches: exact (skips unchanged work; the hf backend), full
# (the same numbers, every row a whole pass), attribution (a gradient estimate; patch_attribution.*).
PATCH_METHODS = ("exact", "full", "attribution")
# The subspaces `rim-lens analyze abstraction --basis` interchanges along: a learned DAS basis, the
# value probe's directions, or random ones (`analysis.abstraction`).
ABSTRACTION_BASES = ("das", "probe", "random")
