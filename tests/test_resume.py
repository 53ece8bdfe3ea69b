"""Never lose a run: resume after SIGKILL/SIGTERM/SIGINT bit for bit, locks, safe overwrite,
the status of a run whose process is gone, and file modes that follow the umask.

The kill tests run `rim-lens train` in subprocesses (one thread each) and kill them with real
signals while they train; the resumed run must end with the same weights (max |diff| <= 1e-6), the
same metrics and the same training log as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rim_lens.cli import main
from rim_lens.runs import Run, RunLock
from training import stages, trainer
from training.config import load_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

# Two stages of 40 steps; 200 training examples in batches of 16 make 12 batches an epoch, so
# checkpoints every 5 steps fall in the middle of epochs; dropout makes the RNG state matter.
RECIPE = """\
method: rim
task: {name: modchain, options: {length: 2, modulus: 5}}
data: {train: 200, val: 16, test: 24}
model: {preset: tiny, max_positions: 64}
memory: {K: 3, M: 1}
train: {steps: 80, batch_size: 16, threads: 1, log_every: 1, eval_every: 10, checkpoint_every: 5,
        stage1_fraction: 0.5, dropout: 0.1, stage2_dropout: 0.2, warmup: 0.1}
eval: {latency_examples: 0}
"""
SAME_METRICS = (
    "accuracy",
    "accuracy_ci",
    "val_accuracy",
    "per_block_accuracy",
    "any_block_accuracy",
    "n_eval",
)


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def start(recipe: Path, runs: Path, name: str, *flags: str) -> subprocess.Popen:
    """`rim-lens train` in a subprocess that uses this checkout's code."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "rim_lens.cli",
        "train",
        str(recipe),
        "--runs-dir",
        str(runs),
        "--name",
        name,
    ]
    return subprocess.Popen(
        [*cmd, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def log_records(run: Path) -> list[dict]:
    path = run / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def signal_when(proc: subprocess.Popen, run: Path, stage: str, step: int, signum: int) -> dict:
    """Send `signum` once the run has logged `step` of `stage`; the last record logged before it."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        records = [r for r in log_records(run) if "loss" in r]
        if any(r["stage"] == stage and r["step"] >= step for r in records):
            proc.send_signal(signum)
            proc.communicate(timeout=120)
            return records[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {stage} step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for training to reach the kill point")


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def same_run(a: Path, b: Path) -> None:
    """Same weights, metrics, predictions and training log (timings aside)."""
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for key in SAME_METRICS:
        assert ma[key] == mb[key], key
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()

    def untimed(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log_records(run)]

    assert untimed(a) == untimed(b)
    for run in (a, b):
        assert Run(run).status()["status"] == "completed"
        assert not (run / "checkpoint").exists(), "the checkpoint is removed once the run completes"


# -- kills -----------------------------------------------------------------------------------------
def test_sigkill_in_each_stage_then_resume_gives_the_same_run(recipe, tmp_path):
    runs = tmp_path / "runs"
    reference = start(recipe, runs, "reference")
    victim = start(recipe, runs, "killed")
    run = runs / "killed"

    last = signal_when(victim, run, "grounding", 12, signal.SIGKILL)
    assert victim.returncode == -signal.SIGKILL and last["stage"] == "grounding"
    # The status file still says running; its process is gone, so the run reads as interrupted.
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    status = Run(run).status()
    assert status["status"] == "interrupted" and "stopped without finishing" in status["error"]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["position"]["stage"] == 0 and 0 < state["position"]["step"] <= last["step"]

    victim = start(recipe, runs, "killed")  # the same command resumes
    last = signal_when(victim, run, "refinement", 8, signal.SIGKILL)
    assert last["stage"] == "refinement"
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["position"]["stage"] == 1 and set(state["stages"]) == {"grounding"}

    out = finish(start(recipe, runs, "killed"))
    assert "test accuracy" in out
    finish(reference)
    same_run(runs / "reference", run)


def test_sigterm_and_sigint_mark_the_run_interrupted_and_resume_exactly(recipe, tmp_path):
    runs = tmp_path / "runs"
    reference = start(recipe, runs, "reference")
    run = runs / "stopped"
    victim = start(recipe, runs, "stopped")
    signal_when(victim, run, "grounding", 7, signal.SIGTERM)
    assert victim.returncode == 128 + signal.SIGTERM
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"]
    # SIGTERM checkpoints the step it stopped at, not only the last periodic one.
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["position"]["step"] == [r for r in log_records(run) if "loss" in r][-1]["step"]

    victim = start(recipe, runs, "stopped")
    signal_when(victim, run, "refinement", 3, signal.SIGINT)
    assert victim.returncode == 128 + signal.SIGINT
    assert Run(run).status()["status"] == "interrupted"

    finish(start(recipe, runs, "stopped"))
    finish(reference)
    same_run(runs / "reference", run)


def test_interrupted_while_scoring_resumes_without_training_again(recipe, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    args = ["train", str(recipe), "--runs-dir", str(runs), "--set", "train.steps=20"]
    assert main([*args, "--name", "reference"]) == 0
    real_score = trainer.score

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "score", stopped)
    assert main([*args, "--name", "x"]) == 130
    run = runs / "x"
    assert Run(run).status()["status"] == "interrupted" and (run / "model").is_dir()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["position"] == {"stage": 2, "step": 0, "epoch": 0, "batch": 0}

    def no_training(*a, **k):
        raise AssertionError("a run whose training was done must not train again")

    monkeypatch.setattr(trainer, "score", real_score)
    monkeypatch.setattr(trainer, "run_stage", no_training)
    capsys.readouterr()
    assert main([*args, "--name", "x"]) == 0
    same_run(runs / "reference", run)


def test_lora_run_resumes_exactly_after_sigterm(tmp_path, monkeypatch):
    """A pretrained model with LoRA: adapters, trainable memory-token rows and optimizer resume."""
    from fixtures import random_checkpoint

    base = random_checkpoint(tmp_path / "base", arch="llama", seed=3)
    data = tmp_path / "chains.jsonl"
    from rim_lens.data import write_examples
    from rim_lens.data.tasks import get_task

    write_examples(data, get_task("modchain", length=2, modulus=5).generate(120, seed=1))
    cfg = load_config(
        None,
        {
            "method": "rim",
            "task": {"name": "modchain", "options": {"length": 2, "modulus": 5}},
            "data": {"train": str(data), "val": 10, "test": 10},
            "model": {
                "pretrained": str(base),
                "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            },
            "memory": {"K": 2, "M": 1},
            "train": {
                "steps": 16,
                "batch_size": 8,
                "threads": 1,
                "log_every": 1,
                "checkpoint_every": 3,
                "stage1_fraction": 0.5,
                "dropout": 0.1,
                "stage2_dropout": 0.1,
            },
            "eval": {"latency_examples": 0},
        },
    )
    trainer.train(cfg, tmp_path / "reference")
    run = Run(tmp_path / "stopped")
    log = Run.log

    def log_then_stop(self, record):
        log(self, record)
        if record.get("stage") == "grounding" and record.get("step") == 5 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)  # handled after this step: checkpoint, then stop

    monkeypatch.setattr(Run, "log", log_then_stop)
    with pytest.raises(stages.Interrupted):
        trainer.train(cfg, run.path)
    monkeypatch.setattr(Run, "log", log)
    assert run.status()["status"] == "interrupted"
    assert json.loads((run.checkpoint_dir / "state.json").read_text())["position"]["step"] == 5
    trainer.train(cfg, run.path)
    same_run(tmp_path / "reference", run.path)


# -- locks ---------------------------------------------------------------------------------------
def test_a_second_train_into_a_running_run_is_refused(recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    first = start(recipe, runs, "busy", "--set", "train.steps=400")
    lock = runs / ".busy.lock"
    try:
        signal_when_ready = time.monotonic() + 240
        while not log_records(runs / "busy") and time.monotonic() < signal_when_ready:
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.01)
        before = sorted(p.name for p in (runs / "busy").iterdir())
        code = main(["train", str(recipe), "--runs-dir", str(runs), "--name", "busy"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "another `rim-lens train` is writing this run" in err[0] and f"pid {first.pid}" in err[0]
        assert sorted(p.name for p in (runs / "busy").iterdir()) == before
        assert Run(runs / "busy").status()["status"] == "running"
    finally:
        first.kill()
        first.communicate()
    # The killed process's lock file stays behind, but the OS lock died with it: stale, taken over.
    assert lock.exists()
    info = json.loads(lock.read_text())
    assert info["pid"] == first.pid and {"host", "started", "time"} <= set(info)
    with RunLock(runs / "busy"):
        pass
    assert not lock.exists()
    assert Run(runs / "busy").status()["status"] == "interrupted"


# -- start over, refuse, overwrite -----------------------------------------------------------------
def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_restart_a_completed_run_and_a_changed_recipe(recipe, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    args = ["train", str(recipe), "--runs-dir", str(runs), "--name", "x", "--set", "train.steps=12"]
    assert main(args) == 0
    completed = _files(runs / "x")
    capsys.readouterr()

    # A completed run is refused, with or without --restart, and left as it was.
    for extra in ([], ["--restart"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "already holds a trained run; pass --overwrite" in err and err.count("\n") == 1
    assert _files(runs / "x") == completed

    # Interrupt a run, then change its recipe: refused (naming the key), until --restart.
    monkeypatch.setattr(trainer, "score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    y = ["train", str(recipe), "--runs-dir", str(runs), "--name", "y", "--set", "train.steps=12"]
    assert main(y) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*y, "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "started with another recipe (train.lr: 0.001 -> 0.01)" in err and "--restart" in err
    # Keys that do not change what is computed may differ on resume.
    assert main([*y, "--set", "train.threads=2", "--set", "train.checkpoint_every=7"]) == 0
    assert "checkpoint_every: 7" in (runs / "y" / "config.yaml").read_text()

    # --restart on an interrupted run starts it over from step 0 with the new recipe.
    monkeypatch.setattr(trainer, "score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    z = ["train", str(recipe), "--runs-dir", str(runs), "--name", "z", "--set", "train.steps=12"]
    assert main(z) == 130
    monkeypatch.undo()
    assert main([*z, "--set", "train.lr=0.01", "--restart"]) == 0
    losses = [r for r in log_records(runs / "z") if "loss" in r]
    assert losses[0]["step"] == 1 and "lr: 0.01" in (runs / "z" / "config.yaml").read_text()


def test_overwrite_swaps_in_the_new_run_only_once_it_has_completed(recipe, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    args = ["train", str(recipe), "--runs-dir", str(runs), "--name", "x", "--set", "train.steps=12"]
    assert main(args) == 0
    old = _files(runs / "x")
    seen = []
    real = trainer.run_stage

    def watching(*a, **k):
        seen.append(_files(runs / "x") == old and (runs / ".x.next" / "status.json").exists())
        return real(*a, **k)

    monkeypatch.setattr(trainer, "run_stage", watching)
    assert main([*args, "--set", "method=pause", "--overwrite"]) == 0
    assert seen == [True], "while the new run trains, the old one is untouched"
    assert "method: pause" in (runs / "x" / "config.yaml").read_text()
    assert Run(runs / "x").status()["status"] == "completed"
    assert sorted(p.name for p in runs.iterdir()) == ["x"], "no staging, old copy or lock left"

    # An --overwrite stopped halfway resumes in its staging directory when run again.
    monkeypatch.setattr(trainer, "score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    before = _files(runs / "x")
    assert main([*args, "--overwrite"]) == 130
    assert _files(runs / "x") == before
    assert Run(runs / ".x.next").status()["status"] == "interrupted"
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "run_stage", lambda *a, **k: pytest.fail("resumed, not retrained"))
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0
    assert "method: rim" in (runs / "x" / "config.yaml").read_text()
    assert sorted(p.name for p in runs.iterdir()) == ["x"]


def test_a_swap_cut_short_is_completed_or_undone(tmp_path):
    from rim_lens.fileio import old_path
    from rim_lens.runs import recover_swap, staging_path

    def run(path: Path, status: str) -> Path:
        path.mkdir(parents=True)
        (path / "status.json").write_text(json.dumps({"status": status}))
        return path

    target = tmp_path / "x"
    # Crashed between the renames with a completed replacement: the swap is finished.
    run(old_path(target), "completed")
    run(staging_path(target), "completed")
    (staging_path(target) / "new").touch()
    recover_swap(target)
    assert (target / "new").exists() and not old_path(target).exists() and not staging_path(target).exists()
    # ... with an unfinished one: the old run comes back.
    shutil.rmtree(target)
    run(old_path(target), "completed")
    (old_path(target) / "old").touch()
    run(staging_path(target), "interrupted")
    recover_swap(target)
    assert (target / "old").exists() and not old_path(target).exists()


# -- status and file modes -------------------------------------------------------------------------
def test_status_of_a_run_whose_process_is_gone(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    run = Run(tmp_path / "r")
    run.path.mkdir()
    run.mark("running", method="rim")
    assert run.status()["status"] == "running"  # this process
    status = json.loads((run.path / "status.json").read_text())
    status["process"]["pid"] = int(gone.stdout)
    (run.path / "status.json").write_text(json.dumps(status))
    assert run.status()["status"] == "interrupted"
    # A recycled pid (same number, another start time) is not the run's process either.
    status["process"].update(pid=os.getpid(), started=status["process"]["started"] - 100)
    (run.path / "status.json").write_text(json.dumps(status))
    assert run.status()["status"] == "interrupted"
    # On another host it cannot be checked: it stays running.
    status["process"].update(host="elsewhere")
    (run.path / "status.json").write_text(json.dumps(status))
    assert run.status()["status"] == "running"

    # The dashboard reads it the same way.
    from dashboards import core

    status["process"].update(host=__import__("socket").gethostname())
    (run.path / "status.json").write_text(json.dumps(status))
    (run.path / "config.yaml").write_text("method: rim\n")
    root = core.Root.of(str(tmp_path))
    (info,) = core.discover(root)[0]
    assert core.run_summary(root, info)["status"] == "interrupted"


def _modes_follow(mask: int, root: Path) -> None:
    paths = [p for p in root.rglob("*") if not p.name.endswith(".lock")]
    assert any(p.parent.name == "model" for p in paths)
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_run_files_follow_the_umask(recipe, tmp_path, mask, monkeypatch):
    runs = tmp_path / "runs"
    args = ["train", str(recipe), "--runs-dir", str(runs), "--name", "x", "--set", "train.steps=6"]
    previous = os.umask(mask)
    try:
        monkeypatch.setattr(trainer, "score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args) == 130  # stopped after training: model/ and checkpoint/ both exist
        assert (runs / "x" / "checkpoint" / "model.safetensors").exists()
        _modes_follow(mask, runs)
        monkeypatch.undo()
        assert main(args) == 0
        _modes_follow(mask, runs)
    finally:
        os.umask(previous)
