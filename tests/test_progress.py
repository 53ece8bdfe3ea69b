"""Progress and logging: a line per stage when stderr is no terminal (never carriage-return bars),
nothing under --quiet, the `rim_lens` logger, and `train.report_to` mirroring train_log.jsonl."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO

from rim_lens.cli import main
from rim_lens.progress import QUIET_ENV, logger, progress

RECIPE = """\
method: rim
task: {name: modchain, options: {length: 2, modulus: 5}}
data: {train: 64, val: 10, test: 12}
model: {preset: tiny, max_positions: 64}
memory: {K: 2, M: 1}
train: {steps: 6, batch_size: 8, threads: 1, log_every: 2, eval_every: 3}
eval: {latency_examples: 0}
"""


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)  # --quiet sets it for child processes; undo after
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_training_piped_to_a_file_writes_lines_not_bars_and_mirrors_its_log_to_tensorboard(recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    with open(tmp_path / "err.txt", "w") as err:
        command = [sys.executable, "-m", "rim_lens.cli", "train", str(recipe), "--runs-dir", str(tmp_path),
                   "--name", "r", "--set", "train.report_to=[tensorboard]"]  # fmt: skip
        done = subprocess.run(command, stderr=err, stdout=subprocess.PIPE, env=env, cwd=tmp_path, timeout=300)
    log = (tmp_path / "err.txt").read_text()
    assert done.returncode == 0, log
    assert "\r" not in log
    lines = log.splitlines()
    assert any(line.startswith("[rim] grounding: ") and "held-out readout accuracy" in line for line in lines)
    assert any(line.startswith("[rim] refinement: ") for line in lines)
    # train_log.jsonl is the source of truth; TensorBoard holds the same numbers.
    run = tmp_path / "r"
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if r.get("stage") == "grounding" and "loss" in r]
    assert losses
    [events] = list((run / "trackers").glob("r/events.out.tfevents.*"))
    scalars = EventAccumulator(str(events)).Reload()
    logged = [(e.step, e.value) for e in scalars.Scalars("grounding/loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)
    accuracy = [r for r in records if "readout_accuracy" in r]
    assert accuracy and "grounding/readout_accuracy/answer" in scalars.Tags()["scalars"]


def test_quiet_training_writes_no_progress(recipe, tmp_path, capsys, no_progress_bars):
    """(Hugging Face's own bars are off in a fresh `rim-lens` process; in this one an earlier test
    may have turned them on, hence `no_progress_bars`.)"""
    assert main(["train", str(recipe), "--runs-dir", str(tmp_path), "--name", "q", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "grounding" not in out
    assert (tmp_path / "q" / "status.json").is_file()


def test_an_unknown_tracker_is_one_line(recipe, tmp_path, capsys):
    code = main(["train", str(recipe), "--runs-dir", str(tmp_path), "--set", "train.report_to=[tensorbored]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "train.report_to" in err and "unknown tracker 'tensorbored'" in err and "tensorboard" in err


def test_a_stage_off_a_terminal_logs_a_line_per_named_step(caplog, monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=logger.name):
        bar = progress(desc="report: rim card", total=2, unit="step")
        bar.step("ablation")
        bar.step("knockout")
        bar.close()
        for _ in progress(range(3), desc="sweep"):  # under a second: no line
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages[:2]] == [
        "report: rim card: ablation done",
        "report: rim card: knockout done",
    ]
    assert len(messages) == 3 and messages[2].startswith("report: rim card: done in ")
    assert messages[2].endswith(" s, 2 x step")
    monkeypatch.setenv(QUIET_ENV, "1")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        progress(desc="quiet", total=1).step("one")
    assert caplog.records == []
