"""The names of everything a run directory holds, and the command that produces each.

`runs/<name>/` holds the resolved recipe, the checkpoint, the data splits it was trained and
scored on, the training log, status, metrics, predictions and, after analyses, `analysis/`.
Every module names these files through this one place.
"""

from __future__ import annotations

CONFIG = "config.yaml"
MODEL = "model"
DATA = "data"
TRAIN_LOG = "train_log.jsonl"
STATUS = "status.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
SWEEP = "sweep.json"
ANALYSIS = "analysis"

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
