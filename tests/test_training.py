"""Training: loss-weight schedules, tiny end-to-end runs of every method, determinism, the run
directory, failure handling and recipe validation.

The end-to-end runs use a copy task written in the GSM8K line format (a data file, so the
held-out questions are disjoint from the training ones): `pick 4 8 1||<<8=8>> #### 8`, the
answer being the middle digit. Chance is 0.1; a 2-layer width-64 model learns it in well under
a hundred steps on one thread.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rim_lens.errors import ConfigError, DataError, RunError
from rim_lens.model.checkpoints import load_checkpoint
from rim_lens.schedules import block_weights, grounding_weights, refinement_weights, step_weights
from training import trainer
from training.config import RunConfig, load_config
from training.trainer import train

torch.set_num_threads(1)

METRIC_KEYS = {
    "method",
    "task",
    "accuracy",
    "answer_tokens_mean",
    "forward_passes_mean",
    "ttft_ms",
    "latency_ms",
    "examples_per_s",
    "n_eval",
}
METRIC_KEYS |= {
    "accuracy_ci",
    "val_accuracy",
    "val_accuracy_ci",
    "test_accuracy",
    "test_accuracy_ci",
    "splits",
}
BLOCK_METRIC_KEYS = {
    "any_block_accuracy",
    "per_block_accuracy",
    "any_block_accuracy_ci",
    "per_block_accuracy_ci",
}


# -- lambda: stage-1 step weights ----------------------------------------------------------------
def test_lambda_is_held_at_one_during_the_hold_phase():
    t = torch.arange(1, 5)
    T = torch.full_like(t, 4)
    for progress in (0.0, 0.1, 0.29):
        assert torch.equal(step_weights(t, T, progress, hold=0.3), torch.ones(4))
    assert torch.equal(step_weights(t, T, 0.3, hold=0.3), torch.ones(4))
    assert torch.equal(step_weights(t, T, 0.99, hold=1.0), torch.ones(4)), "hold=1: never decays"


def test_lambda_decays_linearly_earliest_step_first():
    hold, T = 0.2, 4
    t = torch.arange(1, T + 1)
    Ts = torch.full_like(t, T)
    at = lambda u: step_weights(t, Ts, hold + u * (1 - hold), hold)  # noqa: E731
    # Step t decays from 1 to 0 over u in [(t-1)/T, t/T].
    torch.testing.assert_close(at(0.125), torch.tensor([0.5, 1, 1, 1]))
    torch.testing.assert_close(at(0.25), torch.tensor([0.0, 1, 1, 1]))
    torch.testing.assert_close(at(0.625), torch.tensor([0.0, 0, 0.5, 1]))
    torch.testing.assert_close(at(1.0), torch.zeros(4))
    previous = torch.ones(T)
    for s in torch.linspace(0, 1, 41).tolist():
        w = step_weights(t, Ts, s, hold)
        assert ((w >= 0) & (w <= 1)).all()
        assert (w[:-1] <= w[1:]).all(), "an earlier step never has more weight than a later one"
        assert (w <= previous + 1e-6).all(), "weights only fall"
        previous = w


def test_lambda_is_scheduled_on_each_examples_own_T():
    # Halfway through the decay, an example with T=2 has dropped step 1 and keeps step 2,
    # an example with T=6 has dropped steps 1-3 and keeps 4-6: each by its own T, not max T.
    hold = 0.0
    target_index = torch.tensor([[1, 1, 2, 3, 3, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 7, 0]])
    n_steps = torch.tensor([2, 6])
    w = grounding_weights(target_index, n_steps, progress=0.5, hold=hold)
    expected = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(w, expected)
    # The answer readout (t = T + 1) keeps weight 1 throughout; non-readout positions get 0.
    for s in (0.0, 0.3, 0.7, 1.0):
        w = grounding_weights(target_index, n_steps, s, hold=0.25)
        assert (w[target_index == (n_steps[:, None] + 1)] == 1).all()
        assert (w[target_index == 0] == 0).all()
    w = grounding_weights(target_index, n_steps, 1.0, hold=0.25)
    assert (w[(target_index > 0) & (target_index <= n_steps[:, None])] == 0).all()
    # An example without steps (T = 0) has only its answer readout.
    w = grounding_weights(torch.tensor([[0, 1, 1]]), torch.tensor([0]), 0.9, hold=0.0)
    assert w.tolist() == [[0.0, 1.0, 1.0]]


# -- alpha: stage-2 block weights ----------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 8])
def test_alpha_linear_is_proportional_to_k_and_sums_to_one(K):
    k = torch.arange(1, K + 1)
    a = block_weights(k, K, "linear")
    torch.testing.assert_close(a.sum(), torch.tensor(1.0))
    torch.testing.assert_close(a / a[0], k.float())
    if K == 8:
        torch.testing.assert_close(a[0], torch.tensor(1 / 36))


@pytest.mark.parametrize("K", [1, 3, 8])
def test_alpha_uniform_sums_to_one(K):
    a = block_weights(torch.arange(1, K + 1), K, "uniform")
    torch.testing.assert_close(a, torch.full((K,), 1.0 / K))


def test_refinement_weights_per_position():
    target_index = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 0]])
    w = refinement_weights(target_index, 3, "linear")
    torch.testing.assert_close(w, torch.tensor([[0, 0, 1, 1, 2, 2, 3, 0]]) / 6.0)
    w = refinement_weights(target_index, 3, "uniform")
    torch.testing.assert_close(w, (target_index > 0).float() / 3)
    # Rows with different K (a varied budget): each row's weights are its own K's.
    rows = torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]])
    for kind in ("linear", "uniform"):
        w = refinement_weights(rows, torch.tensor([[2], [4]]), kind)
        torch.testing.assert_close(w[0, :2], refinement_weights(rows[:1, :2], 2, kind)[0])
        torch.testing.assert_close(w[1], refinement_weights(rows[1:], 4, kind)[0])
        torch.testing.assert_close(w.sum(1), torch.ones(2))


# -- tiny end-to-end runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> tuple[Path, Path]:
    """A copy task in GSM8K format: answer the middle of three digits."""
    root = tmp_path_factory.mktemp("copy")
    rng = random.Random(0)
    lines = []
    for q in rng.sample(range(1000), 300):
        a, b, c = f"{q:03d}"
        lines.append(f"pick {a} {b} {c}||<<{b}={b}>> #### {b}")
    (root / "train.txt").write_text("\n".join(lines[:250]) + "\n")
    (root / "eval.txt").write_text("\n".join(lines[250:]) + "\n")
    return root / "train.txt", root / "eval.txt"


def tiny_config(copy_data, method: str, **changes) -> RunConfig:
    train_file, eval_file = copy_data
    overrides = {
        "method": method,
        "task": {"name": "gsm8k"},
        "data": {"train": str(train_file), "val": 20, "test": str(eval_file)},
        "model": {"arch": "gpt2", "preset": "tiny", "max_positions": 64},
        "memory": {"K": 2, "M": 1},
        "train": {
            "steps": 60,
            "batch_size": 32,
            "lr": 0.003,
            "threads": 1,
            "log_every": 10,
            "eval_every": 20,
            "stage1_fraction": 0.5,
            "stage2_lr": 0.001,
            "warmup": 0.0,
        },
        "eval": {"latency_examples": 2},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            overrides.setdefault(section, {})[leaf] = value
        else:
            overrides[section] = value
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def runs(copy_data, tmp_path_factory):
    """One completed run per method (trained once for the whole module)."""
    root = tmp_path_factory.mktemp("runs")
    return {m: train(tiny_config(copy_data, m), root / m) for m in ("direct", "cot", "pause", "rim")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_model_learns_the_copy_task(runs):
    metrics = runs["direct"].read_json("metrics.json")
    assert metrics["n_eval"] == 50
    assert metrics["accuracy"] > 0.6, metrics  # chance: 0.1
    assert runs["cot"].read_json("metrics.json")["accuracy"] > 0.6


@pytest.mark.parametrize("method", ["direct", "cot", "pause", "rim"])
def test_every_method_runs_end_to_end(runs, method):
    run = runs[method]
    status = run.status()
    assert status["status"] == "completed" and status["method"] == method
    metrics = run.read_json("metrics.json")
    assert metrics["method"] == method and metrics["task"] == "gsm8k"
    assert METRIC_KEYS <= set(metrics)
    if method in ("rim", "pause"):
        assert BLOCK_METRIC_KEYS <= set(metrics)
        assert len(metrics["per_block_accuracy"]) == 2
        assert metrics["K"] == 2
    else:
        assert metrics["K"] == 0
    assert metrics["ttft_ms"] > 0 and metrics["latency_ms"] >= metrics["ttft_ms"]
    assert metrics["answer_tokens_mean"] >= 1 and metrics["forward_passes_mean"] >= 1
    if method == "cot":
        # CoT writes its steps before the answer: more tokens, more forward passes.
        direct = runs["direct"].read_json("metrics.json")
        assert metrics["answer_tokens_mean"] > direct["answer_tokens_mean"]


def test_rim_switches_stage_with_reset_schedule(runs):
    log = read_jsonl(runs["rim"].path / "train_log.jsonl")
    losses = [r for r in log if "loss" in r]
    stages = [r["stage"] for r in losses]
    assert stages == sorted(stages, key=["grounding", "refinement"].index), "grounding, then refinement"
    assert {"grounding", "refinement"} == set(stages)
    # Stage 1: 30 steps at lr 0.003; stage 2: 30 steps counted from 1 again at stage2_lr.
    g = [r for r in losses if r["stage"] == "grounding"]
    r2 = [r for r in losses if r["stage"] == "refinement"]
    assert [r["step"] for r in g] == [10, 20, 30] and [r["step"] for r in r2] == [10, 20, 30]
    assert all(r["lr"] == pytest.approx(0.003) for r in g)
    assert all(r["lr"] == pytest.approx(0.001) for r in r2)
    status = runs["rim"].status()
    assert set(status["stages"]) == {"grounding", "refinement"}
    # pause is refinement only
    pause_stages = {r["stage"] for r in read_jsonl(runs["pause"].path / "train_log.jsonl")}
    assert pause_stages == {"refinement"}


def test_varied_budget_draws_each_examples_K_and_M(copy_data, tmp_path):
    """`train.K_choices` / `M_choices`: each stage-2 training example gets its K and M from the
    lists (every combination occurs, the same draw every time), the loss weights follow each row's
    own K, while the held-out check, the checkpoint and evaluation keep memory.K and M."""
    from rim_lens.model.layouts import Role, SequenceBuilder

    cfg = tiny_config(copy_data, "pause", train__K_choices=[1, 3], train__M_choices=[0, 2], train__steps=20)
    run = train(cfg, tmp_path / "varied")
    _, tokenizer, spec = load_checkpoint(run.model_dir)
    assert (spec.K, spec.M) == (2, 1)
    assert run.read_json("metrics.json")["K"] == 2
    held_out = {
        name for r in read_jsonl(run.path / "train_log.jsonl") for name in r.get("readout_accuracy", {})
    }
    assert held_out == {"block_1", "block_2"}
    builder = SequenceBuilder(tokenizer, spec)
    (stage,) = trainer.plan_stages(cfg, builder)
    examples = trainer.load_data(cfg, trainer.get_task("gsm8k")).train
    drawn = set()
    for ex in examples:
        seq = stage.layout(ex)
        assert seq.ids == stage.layout(ex).ids
        K = max(seq.blocks)
        M = sum(1 for r, b in zip(seq.roles, seq.blocks) if r == Role.MEMORY and b == 1)
        assert seq.ids == builder.refinement(ex, n_blocks=K, n_memory=M).ids
        drawn.add((K, M))
    assert drawn == {(1, 0), (1, 2), (3, 0), (3, 2)}
    assert stage.held_out(examples[0]).ids == builder.refinement(examples[0]).ids
    assert len(stage.largest(examples[0])) == len(builder.refinement(examples[0], n_blocks=3, n_memory=2))
    batch = builder.collate([stage.layout(ex) for ex in examples[:32]])
    weights = stage.weights(batch, 0.0)
    for row, ti in enumerate(batch.target_index):
        K = int(batch.blocks[row].max())
        torch.testing.assert_close(weights[row], refinement_weights(ti[None], K, cfg.train.alpha)[0])
    assert len(set(batch.blocks.amax(1).tolist())) == 2


def test_run_directory_contents(runs, copy_data):
    run = runs["rim"]
    names = {p.name for p in run.path.iterdir()}
    assert {
        "config.yaml",
        "model",
        "train_log.jsonl",
        "metrics.json",
        "predictions.jsonl",
        "status.json",
        "data",
    } <= names
    # config.yaml is a recipe that reloads to the same configuration.
    assert load_config(run.path / "config.yaml") == tiny_config(copy_data, "rim")
    model_files = {p.name for p in run.model_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "rim_memory.json",
    } <= model_files
    model, tokenizer, spec = load_checkpoint(run.model_dir)
    assert spec.method == "rim" and spec.K == 2 and spec.M == 1 and spec.task == "gsm8k"
    assert len(tokenizer) == model.config.vocab_size

    log = read_jsonl(run.path / "train_log.jsonl")
    for stage in ("grounding", "refinement"):
        losses = [r for r in log if r["stage"] == stage and "loss" in r]
        assert losses and all(isinstance(r["loss"], float) for r in losses)
        assert all({"step", "lr", "elapsed_s", "tokens_seen"} <= set(r) for r in losses)
    stage1_acc = [r["readout_accuracy"] for r in log if r["stage"] == "grounding" and "readout_accuracy" in r]
    assert stage1_acc and all(set(a) == {"step_1", "answer"} for a in stage1_acc)
    assert all(0.0 <= v <= 1.0 for a in stage1_acc for v in a.values())
    stage2_acc = [
        r["readout_accuracy"] for r in log if r["stage"] == "refinement" and "readout_accuracy" in r
    ]
    assert stage2_acc and set(stage2_acc[-1]) == {"block_1", "block_2"}

    metrics = run.read_json("metrics.json")
    assert METRIC_KEYS | BLOCK_METRIC_KEYS <= set(metrics)
    predictions = read_jsonl(run.path / "predictions.jsonl")
    assert len(predictions) == metrics["n_eval"] == 50
    assert {"id", "question", "answer", "prediction", "correct", "per_block", "per_block_correct"} <= set(
        predictions[0]
    )
    assert sum(p["correct"] for p in predictions) / 50 == pytest.approx(metrics["accuracy"])
    assert metrics["accuracy"] == metrics["test_accuracy"] and metrics["scored_on"] == "test"
    lo, hi = metrics["accuracy_ci"]
    assert lo <= metrics["accuracy"] <= hi and hi - lo > 0.05  # a 95% interval over 50 questions
    assert len(read_jsonl(run.path / "predictions_val.jsonl")) == metrics["n_val"] == 20
    assert sum(any(p["per_block_correct"]) for p in predictions) / 50 == pytest.approx(
        metrics["any_block_accuracy"]
    )
    eval_questions = {
        json.loads(line)["question"] for line in (run.path / "data" / "test.jsonl").read_text().splitlines()
    }
    val_questions = {
        json.loads(line)["question"] for line in (run.path / "data" / "val.jsonl").read_text().splitlines()
    }
    assert len(val_questions) == 20 and not val_questions & eval_questions
    train_questions = {
        json.loads(line)["question"] for line in (run.path / "data" / "train.jsonl").read_text().splitlines()
    }
    assert len(eval_questions) == 50 and not (eval_questions | val_questions) & train_questions


def test_same_seed_same_metrics(copy_data, tmp_path):
    def run(name, seed):
        cfg = tiny_config(copy_data, "rim", seed=seed, train__steps=16, train__log_every=4)
        r = train(cfg, tmp_path / name)
        losses = [
            (x["stage"], x["step"], x["loss"]) for x in read_jsonl(r.path / "train_log.jsonl") if "loss" in x
        ]
        return r, r.read_json("metrics.json"), losses

    a, ma, la = run("a", 0)
    b, mb, lb = run("b", 0)
    for key in (
        "accuracy",
        "per_block_accuracy",
        "any_block_accuracy",
        "answer_tokens_mean",
        "forward_passes_mean",
    ):
        assert ma[key] == mb[key], key
    assert la == lb
    assert (a.path / "predictions.jsonl").read_text() == (b.path / "predictions.jsonl").read_text()
    wa, wb = (load_file(r.model_dir / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A different seed trains differently (so the check above is not vacuous).
    _, _, lc = run("c", 1)
    assert lc != la


def test_snapshots_keep_the_model_of_every_periodic_checkpoint(copy_data, tmp_path):
    from rim_lens import artefacts

    cfg = tiny_config(copy_data, "rim", train__steps=20, train__checkpoint_every=4, train__snapshots=True)
    run = train(cfg, tmp_path / "rim")
    names = sorted(p.name for p in (run.path / artefacts.SNAPSHOTS).iterdir())
    # The start (the initial weights), stage 1's 10 steps: checkpoints at 4 and 8 and its end;
    # stage 2 at 14, 18 and the end.
    assert names == [artefacts.snapshot_name(s) for s in (0, 4, 8, 10, 14, 18, 20)]
    last, _, spec = load_checkpoint(run.path / artefacts.SNAPSHOTS / names[-1])
    final, _, final_spec = load_checkpoint(run.model_dir)
    assert spec == final_spec
    final_weights = final.state_dict()
    assert all(torch.equal(v, final_weights[k]) for k, v in last.state_dict().items())


# -- failures ------------------------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_failing_run_keeps_the_old_run(runs, copy_data, tmp_path):
    run_dir = tmp_path / "direct"
    shutil.copytree(runs["direct"].path, run_dir)
    before = _snapshot(run_dir)
    cfg = tiny_config(copy_data, "direct", data__train=str(tmp_path / "missing.txt"))
    with pytest.raises(RunError, match="already holds a trained run"):
        train(cfg, run_dir)  # without overwrite a finished run is never touched
    # A bad input fails before anything is written: the old run, status included, is as it was.
    with pytest.raises(DataError, match="missing.txt"):
        train(cfg, run_dir, overwrite=True)
    assert _snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct"]
    load_checkpoint(run_dir / "model")


def test_failure_during_an_overwrite_keeps_the_old_run(runs, copy_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "rim"
    shutil.copytree(runs["rim"].path, run_dir)
    before = _snapshot(run_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer, "run_stage", broken)
    with pytest.raises(RuntimeError):
        train(tiny_config(copy_data, "rim"), run_dir, overwrite=True)
    assert _snapshot(run_dir) == before
    # The failed replacement stays beside it, marked failed, for the record.
    status = json.loads((tmp_path / ".rim.next" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: disk full"


def test_interrupted_overwrite_is_marked_interrupted_and_keeps_the_old_run(
    runs, copy_data, tmp_path, monkeypatch
):
    run_dir = tmp_path / "rim"
    shutil.copytree(runs["rim"].path, run_dir)
    before = _snapshot(run_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(copy_data, "rim"), run_dir, overwrite=True)
    status = json.loads((tmp_path / ".rim.next" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["error"].startswith("KeyboardInterrupt")
    assert _snapshot(run_dir) == before


# -- recipe validation ---------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "method: rim\ntrain:\n  steps: 10\n  stepz: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4:") and "train.stepz" in msg and "steps" in msg
    assert "\n" not in msg
    path = write(tmp_path, "methd: rim\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: unknown key 'methd'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'train\.stepz'"):
        load_config(None, ["train.stepz=3"])


def test_bad_values_name_file_line_and_key(tmp_path):
    cases = [
        ("train:\n  lr: fast\n", 2, "train.lr", "expected float"),
        ("train:\n  steps: 0\n", 2, "train.steps", "must be >= 1"),
        ("seed: 1\ntrain:\n  warmup: 1.5\n", 3, "train.warmup", "must be in [0.0, 1.0]"),
        ("memory:\n  readout_sees_question: maybe\n", 2, "memory.readout_sees_question", "expected bool"),
        ("train: 5\n", 1, "train", "expected a mapping"),
    ]
    cases += [
        ("train:\n  K_choices: [8, 0]\n", 2, "train.K_choices", "list of whole numbers >= 1"),
        ("train:\n  M_choices: []\n", 2, "train.M_choices", "list of whole numbers >= 0"),
        ("train:\n  K_choices: [8, many]\n", 2, "train.K_choices", "expected int"),
        ("train:\n  K_choices: 8\n", 2, "train.K_choices", "expected list"),
    ]
    for text, line, key, problem in cases:
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}:{line}:"), msg
        assert key in msg and problem in msg, msg


def test_bad_choices(tmp_path):
    path = write(tmp_path, "name: x\nmethod: icot\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:2: method: must be one of") and "'icot'" in str(err.value)
    for override, key in [
        ("model.arch=bert", "model.arch"),
        ("train.alpha=exp", "train.alpha"),
        ("train.lr_schedule=linear", "train.lr_schedule"),
    ]:
        with pytest.raises(ConfigError, match=rf"{key}: must be one of"):
            load_config(None, [override])


def test_other_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "method: rim\ntrain:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="LoRA needs model.pretrained"):
        load_config(None, {"model": {"lora": {"r": 4}}})
    # An override replaces the recipe's value and its line number no longer applies.
    path = write(tmp_path, "train:\n  steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.steps=-1"])
    assert str(err.value).startswith(f"{path} (with --set): train.steps")
    assert load_config(path, ["train.steps=7", "method=cot"]).train.steps == 7


def test_trainer_runs_unchanged_under_accelerate_launch(tmp_path):
    """Two CPU processes through `accelerate launch`: the same trainer, one finished run."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: rim\ntask: {name: modchain, options: {length: 2}}\ndata: {train: 400, val: 20, test: 40}\n"
        "model: {preset: tiny}\nmemory: {K: 2}\n"
        "train: {steps: 6, batch_size: 16, eval_every: 3, log_every: 3, threads: 1}\n"
        "eval: {latency_examples: 1}\n"
    )
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "accelerate"),
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "rim_lens.cli",
        "train",
        str(recipe),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--name",
        "ddp",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "ddp"
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert (run / "model" / "model.safetensors").exists() and (run / "metrics.json").exists()
