"""Smoke tests of the `rim-lens` command line: train, eval, the memory-budget sweep, and the
one-line errors (exit status 2, no traceback)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rim_lens.cli import main

torch.set_num_threads(1)

RECIPE = """\
name: smoke
method: rim
task:
  name: modchain
  options: {length: 2, modulus: 5}
data: {train: 64, val: 10, test: 12}
model: {preset: tiny, max_positions: 64}
memory: {K: 3}
train: {steps: 500, batch_size: 16, threads: 1}
eval: {latency_examples: 1}
"""


# One-line error checks read stderr: keep the weight-loading bar off it (see conftest.py).
pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "smoke.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("runs")
    # A module-scoped fixture cannot use capsys: capture by redirection.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(
            [
                "train",
                str(recipe),
                "--runs-dir",
                str(runs),
                "--set",
                "train.steps=6",
                "--set",
                "train.log_every=3",
                "--set",
                "train.eval_every=3",
            ]
        )
    assert code == 0
    return runs / "smoke", out.getvalue()


def error_line(capsys) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rim-lens: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_train_with_overrides(trained):
    run, out = trained
    assert f"{run}: test accuracy" in out and "on 12 held-out examples" in out
    config = (run / "config.yaml").read_text()
    assert "steps: 6\n" in config and "name: smoke\n" in config
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "rim" and metrics["K"] == 3 and metrics["n_eval"] == 12
    assert (run / "model" / "model.safetensors").exists()


def test_eval_run(trained, capsys):
    run, _ = trained
    before = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run}: test accuracy ") and ", val " in out
    after = json.loads((run / "metrics.json").read_text())
    for key in (
        "accuracy",
        "per_block_accuracy",
        "any_block_accuracy",
        "answer_tokens_mean",
        "val_accuracy",
        "test_accuracy_ci",
        "train_steps",
        "splits",
    ):
        assert after[key] == before[key], key


def test_eval_scores_test_for_a_run_searched_on_validation(trained, tmp_path, capsys):
    """A run trained with eval.score_test off (a settings search) gets its test figures from
    `rim-lens eval` once it is chosen; its recipe stays as trained."""
    run = tmp_path / "searched"
    shutil.copytree(trained[0], run)
    config = (run / "config.yaml").read_text()
    assert "score_test: true\n" in config
    (run / "config.yaml").write_text(config.replace("score_test: true\n", "score_test: false\n"))
    full = json.loads((run / "metrics.json").read_text())
    searched = {k: v for k, v in full.items() if not k.startswith("test_")}
    (run / "metrics.json").write_text(json.dumps(dict(searched, scored_on="val")))
    assert main(["eval", str(run)]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["scored_on"] == "test"
    assert after["test_accuracy"] == after["accuracy"] == full["test_accuracy"]
    assert after["val_accuracy"] == full["val_accuracy"]
    assert "score_test: false\n" in (run / "config.yaml").read_text()


def test_eval_sweep_over_K(trained, capsys):
    run, _ = trained
    assert main(["eval", str(run), "--K", "1,2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["K=1 M=2 (test)", "K=2 M=2 (test)"]
    sweep = json.loads((run / "sweep.json").read_text())
    assert [(s["K"], s["M"]) for s in sweep] == [(1, 2), (2, 2)]
    for s in sweep:
        assert len(s["per_block_accuracy"]) == s["K"]
    for K in (1, 2):
        metrics = json.loads((run / f"metrics_K{K}_M2_test.json").read_text())
        assert metrics["K"] == K and metrics["M"] == 2 and metrics["split"] == "test"
        assert (run / f"predictions_K{K}_M2_test.jsonl").exists()
    # The trained setting's metrics.json is untouched by a sweep at other K.
    assert json.loads((run / "metrics.json").read_text())["K"] == 3
    # A second sweep updates entries rather than duplicating them.
    assert main(["eval", str(run), "--K", "2", "--M", "1"]) == 0
    capsys.readouterr()
    sweep = json.loads((run / "sweep.json").read_text())
    assert [(s["K"], s["M"]) for s in sweep] == [(2, 1), (1, 2), (2, 2)]


# -- clear errors --------------------------------------------------------------------------------
def test_missing_recipe(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--runs-dir", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert "nope.yaml" in line and "cannot read recipe" in line


def test_unknown_recipe_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("method: rim\ntrain:\n  steps: 5\n  learning_rate: 0.1\n")
    assert main(["train", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    line = error_line(capsys)
    assert f"{path}:4:" in line and "train.learning_rate" in line
    assert not (tmp_path / "runs").exists(), "nothing is created for an invalid recipe"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.steps=abc", "train.steps: expected int"),
        ("train.steps=0", "train.steps: must be >= 1"),
        ("method=icot", "method: must be one of"),
        ("train.steps", "expected KEY=VALUE"),
    ],
)
def test_bad_set_value(recipe, tmp_path, capsys, override, expected):
    assert main(["train", str(recipe), "--runs-dir", str(tmp_path), "--set", override]) == 2
    assert expected in error_line(capsys)


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "not a rim-lens run" in error_line(capsys)
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in error_line(capsys)


def test_eval_of_a_run_without_a_model(trained, tmp_path, capsys):
    run, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["eval", str(broken)]) == 2
    line = error_line(capsys)
    assert "no model" in line and "rim-lens train" in line


def test_eval_bad_K_list(trained, capsys):
    run, _ = trained
    assert main(["eval", str(run), "--K", "1,two"]) == 2
    assert "--K" in error_line(capsys)


def test_console_script_help():
    exe = Path(sys.executable).parent / "rim-lens"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rim-lens" in result.stdout
    for command in ("train", "eval", "data"):
        assert command in result.stdout
