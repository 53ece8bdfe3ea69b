"""A corpus of bad inputs to every command: each ends with exactly one line
`rim-lens: error: <what, where, what to do>` of at most 300 characters on stderr, exit status 2,
no traceback, and not one file changed (the workspace, runs directory included, is hashed before
and after).

Commands run in-process through `rim_lens.cli.main`; every case gets a fresh workspace holding a
copy of the session's tiny trained runs (tests/fixtures.py) and whatever bad file it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures import clone_runs

from rim_lens.cli import main
from rim_lens.data.tasks import get_task

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_progress_bars")

MAX_LINE = 300
MB = 1 << 20


@dataclass
class Case:
    id: str
    argv: str  # split on spaces after formatting with the workspace's paths
    expect: str  # a piece of the error line
    setup: Callable[[Path], object] | None = None


# -- workspace builders --------------------------------------------------------------------------
def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)

    return make


def link(name: str, target: str) -> Callable[[Path], None]:
    return lambda ws: (ws / name).symlink_to(target)


def both(*steps: Callable[[Path], object]) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        for step in steps:
            step(ws)

    return make


def chains(n: int = 6) -> list[dict]:
    return [ex.to_dict() for ex in get_task("modchain", length=2).generate(n, seed=0)]


def jsonl(name: str, change: Callable[[dict], None] | None = None, n: int = 6) -> Callable[[Path], None]:
    """A valid .jsonl of modchain records, the third one changed by `change`."""
    records = chains(n)
    if change is not None:
        change(records[2])
    return write(name, "".join(json.dumps(r) + "\n" for r in records))


def mult_lines(n: int = 3, digits: int = 2) -> list[str]:
    task = get_task("mult", n=digits)
    return [task.format_line(ex) for ex in task.generate(n, seed=0)]


def recipe(text: str, name: str = "r.yaml") -> Callable[[Path], None]:
    return write(name, text)


RECIPE_OK = (
    "method: rim\ntask: {name: modchain, options: {length: 2}}\ndata: {train: 64, val: 8, test: 8}\n"
    "model: {preset: tiny, max_positions: 64}\nmemory: {K: 2, M: 1}\n"
    "train: {steps: 2, batch_size: 8, threads: 1}\neval: {latency_examples: 0}\n"
)


def patch_file(run: str, name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        path = ws / "runs" / run / name
        data = change(path.read_bytes())
        path.unlink()  # a fresh file: the copy shares nothing with the session's runs
        path.write_bytes(data)

    return make


def truncate(run: str, name: str) -> Callable[[Path], None]:
    return patch_file(run, name, lambda b: b[: len(b) // 2])


def garble(run: str, name: str) -> Callable[[Path], None]:
    return patch_file(run, name, lambda b: b"{ not json" + b[:20])


def status(run: str, **fields) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        path = ws / "runs" / run / "status.json"
        record = json.loads(path.read_text()) | fields
        path.unlink()
        path.write_text(json.dumps(record))

    return make


def interrupted_run(ws: Path) -> None:
    """runs/rim as a run killed while training: no model, no metrics, a dead process."""
    run = ws / "runs" / "rim"
    for name in ("model", "metrics.json", "predictions.jsonl"):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    status("rim", status="running", process={"pid": 2**22 + 7, "host": os.uname().nodename, "started": 1.0})(
        ws
    )


def pretrained(kind: str) -> Callable[[Path], None]:
    """A pretrained-model directory damaged in one way (from the rim run's model)."""

    def make(ws: Path) -> None:
        target = ws / "pre"
        if kind == "empty":
            target.mkdir()
            return
        shutil.copytree(ws / "runs" / "rim" / "model", target)
        if kind == "truncated":
            data = (target / "model.safetensors").read_bytes()
            (target / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif kind == "config":
            (target / "config.json").write_text('{"model_type": ')
        elif kind == "pickle":
            (target / "model.safetensors").rename(target / "pytorch_model.bin")
        elif kind == "tokenizer":
            (target / "tokenizer.json").write_text("[1, 2")

    return make


# model.pretrained is a path relative to the working directory (the workspace), unlike data files.
PRE_RECIPE = RECIPE_OK.replace("model: {preset: tiny, max_positions: 64}", "model: {pretrained: pre}")


# -- the corpus ----------------------------------------------------------------------------------
DATA = [
    Case("validate-missing", "data validate {ws}/nope.txt", "nope.txt: no such file"),
    Case("validate-directory", "data validate {ws}/runs", "is a directory"),
    Case("validate-csv", "data validate {ws}/x.csv", "unknown format '.csv'", write("x.csv", "a,b\n")),
    Case("validate-empty", "data validate {ws}/x.txt", "no examples (the file is empty)", write("x.txt", "")),
    Case("validate-blank", "data validate {ws}/x.txt", "no examples", write("x.txt", "\n  \n\n")),
    Case("validate-dev-zero", "data validate {ws}/x.txt", "line longer than", link("x.txt", "/dev/zero")),
    Case(
        "validate-huge-line",
        "data validate {ws}/x.txt",
        "x.txt:2: line longer",
        write("x.txt", mult_lines()[0] + "\n" + "b" * (2 * MB)),
    ),
    Case(
        "validate-not-utf8", "data validate {ws}/x.txt", "not UTF-8", write("x.txt", b"\xff\xfe\x00 1 * 2\n")
    ),
    Case(
        "validate-no-separators",
        "data validate {ws}/x.txt --task mult",
        "x.txt:1: expected 'question||steps",
        write("x.txt", "hello\n"),
    ),
    Case(
        "validate-wrong-answer",
        "data validate {ws}/x.txt",
        "x.txt:2: expected answer",
        write("x.txt", mult_lines()[0] + "\n" + mult_lines()[1][:-1] + "9\n"),
    ),
    Case(
        "validate-unknown-task-line",
        "data validate {ws}/x.txt",
        "cannot tell the task",
        write("x.txt", "what is this||no #### idea\n"),
    ),
    Case(
        "validate-unknown-task",
        "data validate {ws}/x.txt --task multiply",
        "unknown task 'multiply'",
        write("x.txt", mult_lines()[0] + "\n"),
    ),
    Case(
        "validate-huge-field",
        "data validate {ws}/x.txt --task modchain",
        "x.txt:1: expected steps",
        write("x.txt", "7 " + "+1 " * 300_000 + "mod 10||1 #### 1\n"),
    ),
    Case(
        "validate-all-invalid",
        "data validate {ws}/x.txt --task mult --skip-invalid",
        "no examples (all 2 invalid)",
        write("x.txt", "a||b #### c\nd||e #### f\n"),
    ),
    Case(
        "validate-bad-option",
        "data validate {ws}/x.txt --option n=abc",
        "option n must be an integer",
        write("x.txt", mult_lines()[0] + "\n"),
    ),
    Case(
        "validate-option-syntax",
        "data validate {ws}/x.txt --option n",
        "expected KEY=VALUE",
        write("x.txt", ""),
    ),
    Case(
        "jsonl-wrong-answer",
        "data validate {ws}/x.jsonl",
        "x.jsonl:3: expected answer",
        jsonl("x.jsonl", lambda r: r.update(answer=str((int(r["answer"]) + 1) % 10))),
    ),
    Case(
        "jsonl-wrong-steps",
        "data validate {ws}/x.jsonl",
        "x.jsonl:3: expected steps",
        jsonl("x.jsonl", lambda r: r.update(steps=["1", "2", "3"])),
    ),
    Case(
        "jsonl-wrong-values",
        "data validate {ws}/x.jsonl",
        "x.jsonl:3: expected values",
        jsonl("x.jsonl", lambda r: r.update(values=[9, 9])),
    ),
    Case(
        "jsonl-bad-question",
        "data validate {ws}/x.jsonl",
        "x.jsonl:3: expected a question like",
        jsonl("x.jsonl", lambda r: r.update(question="2 plus 2")),
    ),
    Case(
        "jsonl-corrupt",
        "data validate {ws}/x.jsonl",
        "x.jsonl:2: expected a JSON object",
        write("x.jsonl", "\n{oops\n"),
    ),
    Case(
        "jsonl-missing-fields",
        "data validate {ws}/x.jsonl",
        "x.jsonl:1: expected an object with",
        write("x.jsonl", '{"question": "q"}\n'),
    ),
    Case(
        "jsonl-unknown-task",
        "data validate {ws}/x.jsonl",
        "expected task mult or modchain",
        jsonl("x.jsonl", lambda r: r.update(task="chess")),
    ),
    Case("jsonl-empty", "data validate {ws}/x.jsonl", "no examples", write("x.jsonl", "\n")),
    Case(
        "json-not-a-list",
        "data validate {ws}/x.json",
        "expected a JSON list",
        write("x.json", '{"question": "q"}'),
    ),
    Case(
        "json-corrupt", "data validate {ws}/x.json", "x.json:1: expected a JSON list", write("x.json", "[{")
    ),
    Case(
        "json-wrong-answer",
        "data validate {ws}/x.json",
        "record 1: expected the answer 'Tom is a lempus.'",
        write(
            "x.json",
            json.dumps(
                [
                    {
                        "question": "Tom is a terpus. Is Tom a lempus or scrompus?",
                        "steps": ["Tom is a terpus."],
                        "answer": "Tom is a dog.",
                    }
                ]
            ),
        ),
    ),
    Case("json-dev-zero", "data validate {ws}/x.json", "longer than", link("x.json", "/dev/zero")),
    Case(
        "json-task-mismatch",
        "data validate {ws}/x.json --task mult",
        ".json files hold ProsQA records",
        write("x.json", "[]"),
    ),
    Case(
        "generate-negative-n",
        "data generate mult --n -5 --out {ws}/g.txt",
        "argument --n: must be >= 1, got -5",
    ),
    Case("generate-zero-n", "data generate mult --n 0 --out {ws}/g.txt", "must be >= 1"),
    Case("generate-text-n", "data generate mult --n many --out {ws}/g.txt", "expected an integer"),
    Case(
        "generate-negative-seed",
        "data generate mult --n 3 --seed -1 --out {ws}/g.txt",
        "--seed: must be >= 0",
    ),
    Case("generate-unknown-task", "data generate chess --n 3 --out {ws}/g.txt", "unknown task 'chess'"),
    Case("generate-no-generator", "data generate gsm8k --n 3 --out {ws}/g.txt", "has no generator"),
    Case("generate-bad-suffix", "data generate mult --n 3 --out {ws}/g.csv", "cannot write '.csv' files"),
    Case("generate-out-directory", "data generate mult --n 3 --out {ws}/runs", "is a directory"),
    Case(
        "generate-too-many",
        "data generate mult --n 1000 --option n=1 --out {ws}/g.txt",
        "has only 81 distinct questions",
    ),
    Case(
        "generate-exclude-missing",
        "data generate mult --n 3 --exclude {ws}/nope.txt --out {ws}/g.txt",
        "nope.txt: no such file",
    ),
    Case(
        "generate-bad-option",
        "data generate modchain --n 3 --option length=0 --out {ws}/g.txt",
        "option length must be an integer",
    ),
]

RECIPES = [
    Case("recipe-missing", "train {ws}/nope.yaml --runs-dir {ws}/runs", "cannot read recipe"),
    Case("recipe-directory", "train {ws}/runs --runs-dir {ws}/runs", "is a directory"),
    Case(
        "recipe-invalid-yaml",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:3: invalid YAML",
        recipe("method: rim\ntrain: {steps: [1\n"),
    ),
    Case(
        "recipe-a-list",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "recipe: expected a mapping",
        recipe("- method\n- rim\n"),
    ),
    Case(
        "recipe-unknown-key",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:2: unknown key 'train.stepz'",
        recipe("train:\n  stepz: 3\n"),
    ),
    Case(
        "recipe-duplicate-key",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:3: key 'train.steps' given twice",
        recipe("train:\n  steps: 3\n  steps: 4\n"),
    ),
    Case(
        "recipe-dev-zero",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "longer than",
        link("r.yaml", "/dev/zero"),
    ),
    Case(
        "recipe-bad-type",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:1: train.steps: expected int",
        recipe("train: {steps: many}\n"),
    ),
    Case(
        "recipe-negative-seed",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:1: seed: must be >= 0",
        recipe("seed: -3\n"),
    ),
    Case(
        "recipe-negative-threads",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "train.threads: must be >= 1",
        recipe("train: {threads: -1}\n"),
    ),
    Case(
        "recipe-unknown-preset",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "model.preset: must be one of tiny, small",
        recipe("model: {preset: huge}\n"),
    ),
    Case(
        "recipe-nan-lr",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "train.lr: expected a finite number",
        recipe("train: {lr: .nan}\n"),
    ),
    Case(
        "recipe-name-escapes",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "name: '../../x' is not a run name",
        recipe("name: ../../x\n"),
    ),
    Case(
        "recipe-name-absolute",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "is not a run name",
        recipe("name: /tmp/x\n"),
    ),
    Case(
        "recipe-data-missing",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "/sub/train.txt: no such file",
        recipe(RECIPE_OK.replace("train: 64,", "train: train.txt,"), "sub/r.yaml"),
    ),
    Case(
        "recipe-data-empty-path",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "data.train: expected a data file or a number",
        recipe("data: {train: ''}\n"),
    ),
    Case(
        "recipe-data-wrong-answers",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "bad.jsonl:3: expected answer",
        both(
            jsonl("bad.jsonl", lambda r: r.update(answer="x")),
            recipe(RECIPE_OK.replace("train: 64,", "train: bad.jsonl,")),
        ),
    ),
    Case(
        "recipe-lora-alone",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "LoRA needs model.pretrained",
        recipe("model: {lora: {r: 4}}\n"),
    ),
    Case(
        "recipe-lora-unknown",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "unknown LoraConfig field(s) rank",
        recipe("model: {pretrained: x, lora: {rank: 4}}\n"),
    ),
    Case(
        "recipe-task-option",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "task.options: task mult: option n must be an integer 1..9",
        recipe("task: {name: mult, options: {n: 12}}\n"),
    ),
    Case(
        "recipe-max-positions",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "model.max_positions: the model takes 8 positions",
        recipe(RECIPE_OK.replace("max_positions: 64", "max_positions: 8")),
    ),
    Case(
        "recipe-same-tokens",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "three different tokens",
        recipe("memory: {begin: <m>}\n"),
    ),
    Case(
        "pretrained-empty-dir",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "pre: no config.json here",
        both(pretrained("empty"), recipe(PRE_RECIPE, "sub/r.yaml")),
    ),
    Case(
        "pretrained-truncated",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "model.safetensors: truncated",
        both(pretrained("truncated"), recipe(PRE_RECIPE, "sub/r.yaml")),
    ),
    Case(
        "pretrained-bad-config",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "config.json:1: corrupt JSON",
        both(pretrained("config"), recipe(PRE_RECIPE, "sub/r.yaml")),
    ),
    Case(
        "pretrained-pickle-only",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "safetensors only",
        both(pretrained("pickle"), recipe(PRE_RECIPE, "sub/r.yaml")),
    ),
    Case(
        "pretrained-bad-tokenizer",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "tokenizer.json:1: corrupt JSON",
        both(pretrained("tokenizer"), recipe(PRE_RECIPE, "sub/r.yaml")),
    ),
    Case(
        "set-malformed-yaml", "train --runs-dir {ws}/runs --set train.steps=[1", "the value is not valid YAML"
    ),
    Case("set-scalar-over-section", "train --runs-dir {ws}/runs --set train=5", "train: expected a mapping"),
    Case(
        "set-key-under-scalar",
        "train --runs-dir {ws}/runs --set train=5 --set train.steps=3",
        "'train' was set to a value by an earlier --set",
    ),
    Case("set-no-equals", "train --runs-dir {ws}/runs --set train.steps", "expected KEY=VALUE"),
    Case("set-empty-key", "train --runs-dir {ws}/runs --set .steps=3", "expected KEY=VALUE"),
    Case("set-unknown-key", "train --runs-dir {ws}/runs --set train.lrr=1", "unknown key 'train.lrr'"),
    Case("set-bad-choice", "train --runs-dir {ws}/runs --set method=cot2", "method: must be one of"),
    Case("name-with-slash", "train --runs-dir {ws}/runs --name a/b", "--name: 'a/b' is not a run name"),
    Case("name-dotdot", "train --runs-dir {ws}/runs --name ..", "is not a run name"),
    Case("name-hidden", "train --runs-dir {ws}/runs --name .x", "is not a run name"),
    Case(
        "runs-dir-is-a-file",
        "train {ws}/r.yaml --runs-dir {ws}/r.yaml --name x",
        "--runs-dir",
        recipe(RECIPE_OK),
    ),
]

RUNS = [
    Case(
        "train-into-completed",
        "train {ws}/r.yaml --runs-dir {ws}/runs --name rim",
        "already holds a trained run; pass --overwrite",
        recipe(RECIPE_OK),
    ),
    Case(
        "train-into-foreign-dir",
        "train {ws}/r.yaml --runs-dir {ws} --name stuff",
        "exists and is not a rim-lens run",
        both(recipe(RECIPE_OK), write("stuff/notes.txt", "mine")),
    ),
    Case(
        "train-corrupt-status",
        "train {ws}/r.yaml --runs-dir {ws}/runs --name rim",
        "status.json:1: corrupt JSON",
        both(recipe(RECIPE_OK), garble("rim", "status.json")),
    ),
    Case("eval-missing-run", "eval {ws}/runs/nope", "no such run directory"),
    Case(
        "eval-not-a-run",
        "eval {ws}/runs/empty",
        "not a rim-lens run",
        lambda ws: (ws / "runs" / "empty").mkdir(),
    ),
    Case("eval-K-zero", "eval {ws}/runs/rim --K 0", "--K '0': every value must be >= 1"),
    Case("eval-K-negative", "eval {ws}/runs/rim --K 2,-1", "every value must be >= 1"),
    Case("eval-K-text", "eval {ws}/runs/rim --K 1,two", "expected integers separated by commas"),
    Case("eval-M-negative", "eval {ws}/runs/rim --M -1", "--M '-1': every value must be >= 0"),
    Case("eval-n-zero", "eval {ws}/runs/rim --n 0", "argument --n: must be >= 1, got 0"),
    Case("eval-n-negative", "eval {ws}/runs/rim --n -5", "must be >= 1, got -5"),
    Case("eval-K-too-many", "eval {ws}/runs/rim --K 500", "positions but the model takes 64"),
    Case("eval-K-on-direct", "eval {ws}/runs/direct --K 2", "is a direct model, which has no memory blocks"),
    Case("eval-bad-split", "eval {ws}/runs/rim --split train", "invalid choice: 'train'"),
    Case("eval-data-missing", "eval {ws}/runs/rim --n 3 --data {ws}/nope.jsonl", "nope.jsonl: no such file"),
    Case(
        "eval-data-other-task",
        "eval {ws}/runs/rim --n 3 --data {ws}/x.jsonl",
        "expected task gsm8k, got 'modchain'",
        jsonl("x.jsonl"),
    ),
    Case(
        "ckpt-truncated-weights",
        "eval {ws}/runs/rim",
        "model.safetensors: truncated",
        truncate("rim", "model/model.safetensors"),
    ),
    Case(
        "ckpt-corrupt-config",
        "eval {ws}/runs/rim",
        "model/config.json:1: corrupt JSON",
        garble("rim", "model/config.json"),
    ),
    Case(
        "ckpt-corrupt-tokenizer",
        "eval {ws}/runs/rim",
        "tokenizer.json:1: corrupt JSON",
        garble("rim", "model/tokenizer.json"),
    ),
    Case(
        "ckpt-corrupt-memory-spec",
        "eval {ws}/runs/rim",
        "rim_memory.json: unreadable memory spec",
        garble("rim", "model/rim_memory.json"),
    ),
    Case(
        "ckpt-not-safetensors",
        "eval {ws}/runs/rim",
        "not a safetensors file",
        patch_file("rim", "model/model.safetensors", lambda b: b"\xff" * 64),
    ),
    Case(
        "run-corrupt-config",
        "eval {ws}/runs/rim",
        "config.yaml:2: invalid YAML",
        patch_file("rim", "config.yaml", lambda b: b"method: [rim\n"),
    ),
    Case(
        "run-interrupted",
        "eval {ws}/runs/rim",
        "is interrupted and has no model yet; run its `rim-lens train` command again",
        interrupted_run,
    ),
    Case(
        "run-corrupt-split",
        "eval {ws}/runs/rim",
        "data/val.jsonl:1: expected a JSON object",
        patch_file("rim", "data/val.jsonl", lambda b: b"{oops\n" + b),
    ),
]

# runs/int: a run stopped after training (trained with RECIPE_OK, `--name int`), holding a checkpoint.
RESUME = "train {ws}/r.yaml --runs-dir {ws}/runs --name int"
CHECKPOINTS = [
    Case(
        "resume-truncated-weights",
        RESUME,
        "checkpoint/model.safetensors: truncated",
        both(recipe(RECIPE_OK), truncate("int", "checkpoint/model.safetensors")),
    ),
    Case(
        "resume-corrupt-state",
        RESUME,
        "checkpoint/state.json:1: corrupt JSON",
        both(recipe(RECIPE_OK), garble("int", "checkpoint/state.json")),
    ),
    Case(
        "resume-missing-optimizer",
        RESUME,
        "optimizer.safetensors: no such file; pass --restart",
        both(recipe(RECIPE_OK), lambda ws: (ws / "runs/int/checkpoint/optimizer.safetensors").unlink()),
    ),
    Case(
        "resume-foreign-weights",
        RESUME,
        "checkpoint/model.safetensors: changed since the checkpoint was written",
        both(
            recipe(RECIPE_OK),
            lambda ws: shutil.copy(
                ws / "runs/rim/model/model.safetensors", ws / "runs/int/checkpoint/model.safetensors"
            ),
        ),
    ),
    Case(
        "resume-other-recipe",
        RESUME + " --set train.lr=0.5",
        "started with another recipe (train.lr: 0.001 -> 0.5)",
        recipe(RECIPE_OK),
    ),
]

# A damaged capture is not bad input: the Lab makes it again (see test_a_damaged_capture_is_made_again).
CAPTURES = [
    Case("analyze-n-zero", "analyze pca {ws}/runs/cap --n 0", "argument --n: must be >= 1"),
    Case("analyze-bad-layers", "analyze pca {ws}/runs/cap --layers x", "expected 'all' or integers"),
    Case("analyze-direct-run", "analyze pca {ws}/runs/direct", "has no memory blocks"),
    Case("analyze-unknown-what", "analyze everything {ws}/runs/cap", "invalid choice: 'everything'"),
    Case("analyze-bad-split", "analyze pca {ws}/runs/cap --split dev", "invalid choice: 'dev'"),
    Case(
        "analyze-missing-split",
        "analyze pca {ws}/runs/cap --split val",
        "run has no data/val.jsonl; produce it with `rim-lens train RECIPE`",
        lambda ws: (ws / "runs/cap/data/val.jsonl").unlink(),
    ),
    Case(
        "analyze-data-other-task",
        "analyze pca {ws}/runs/cap --data {ws}/x.jsonl",
        "x.jsonl:1: expected task gsm8k, got 'modchain'",
        jsonl("x.jsonl"),
    ),
    Case(
        "analyze-corrupt-run-config",
        "analyze pca {ws}/runs/cap --n 8 --data {ws}/runs/cap/data/test.jsonl",
        "config.yaml: corrupt run config",
        patch_file("cap", "config.yaml", b"task: [\n".__add__),
    ),
    Case(
        "analyze-truncated-weights",
        "analyze pca {ws}/runs/cap --n 8",
        "model.safetensors: truncated",
        truncate("cap", "model/model.safetensors"),
    ),
]

OTHERS = [
    Case("dashboard-root-is-a-file", "dashboard {ws}/r.yaml", "RUNS_DIR", recipe(RECIPE_OK)),
    Case("dashboard-port-zero", "dashboard {ws}/runs --port 0", "--port 0: expected a port number"),
    Case("dashboard-port-text", "dashboard {ws}/runs --port http", "invalid int value"),
    Case("dashboard-remote-host", "dashboard {ws}/runs --host 0.0.0.0", "pass --allow-remote"),
    Case("dashboard-remote-ipv6", "dashboard {ws}/runs --host :: --allow-actions", "pass --allow-remote"),
    Case(
        "demo-unknown-method",
        "demo --methods rim,cocnut --runs-dir {ws}/runs/demo",
        "--methods: unknown cocnut",
    ),
    Case("demo-bad-set", "demo --runs-dir {ws}/runs/demo --set train.steps=-1", "train.steps: must be >= 1"),
    Case("unknown-command", "fly", "invalid choice: 'fly'"),
    Case("no-command", "", "the following arguments are required"),
]

CORPUS = DATA + RECIPES + RUNS + CHECKPOINTS + CAPTURES + OTHERS


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CORPUS) >= 60 and len({c.id for c in CORPUS}) == len(CORPUS)
    commands = {
        c.argv.split(" ")[0] + (" " + c.argv.split(" ")[1] if c.argv.startswith("data") else "")
        for c in CORPUS
    }
    assert {"data validate", "data generate", "train", "eval", "analyze", "dashboard", "demo"} <= commands
    assert all(group for group in (DATA, RECIPES, RUNS, CHECKPOINTS, CAPTURES, OTHERS))


# -- the harness ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured(tiny_runs, tmp_path_factory) -> Path:
    """The tiny RiM run with a capture of 8 test examples under analysis/capture."""
    run = clone_runs({"rim": tiny_runs["rim"]}, tmp_path_factory.mktemp("captured"))["rim"]
    assert main(["analyze", "capture", str(run), "--n", "8", "--data", str(run / "data" / "test.jsonl")]) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run of RECIPE_OK stopped after its training, before scoring: it holds a checkpoint."""
    from training import trainer

    root = tmp_path_factory.mktemp("interrupted")
    (root / "r.yaml").write_text(RECIPE_OK)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "score", stop)
        assert main(["train", str(root / "r.yaml"), "--runs-dir", str(root), "--name", "int"]) == 130
    assert (root / "int" / "checkpoint" / "state.json").exists()
    return root / "int"


def fingerprint(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: content hashes, link targets (never followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input(case, tiny_runs, captured, interrupted, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    runs = ws / "runs"
    runs.mkdir(parents=True)
    for name in ("rim", "direct"):
        shutil.copytree(tiny_runs[name], runs / name)
    if "{ws}/runs/cap" in case.argv:
        shutil.copytree(captured, runs / "cap")
    if "--name int" in case.argv:
        shutil.copytree(interrupted, runs / "int")
    if case.setup is not None:
        case.setup(ws)
    monkeypatch.chdir(ws)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("the dashboard must not start on bad input"))
    before = fingerprint(ws)
    capsys.readouterr()

    code = main([a for a in case.argv.format(ws=ws).split(" ") if a])

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("rim-lens: error: ") and len(lines[0]) <= MAX_LINE, lines[0]
    assert "Traceback" not in err
    assert case.expect in lines[0], lines[0]
    assert fingerprint(ws) == before, "a bad input changed a file"


@pytest.mark.parametrize(
    "damage",
    [
        garble("cap", "analysis/capture/meta.json"),
        patch_file("cap", "analysis/capture/meta.json", lambda b: b"[]"),
        truncate("cap", "analysis/capture/shard_00000.safetensors"),
        patch_file("cap", "analysis/capture/examples.jsonl", lambda b: b"{" + b),
    ],
    ids=["corrupt-meta", "meta-not-a-capture", "truncated-shard", "corrupt-examples"],
)
def test_a_damaged_capture_is_made_again(damage, captured, tmp_path, capsys):
    """The capture's files are checked when it is opened (a truncated shard too, by its header),
    so a damaged capture is captured again instead of failing halfway or being read."""
    from rim_lens.analysis.capture import CaptureStore
    from rim_lens.fileio import check_safetensors

    ws = tmp_path / "ws"
    shutil.copytree(captured, ws / "runs" / "cap")
    damage(ws)
    run = ws / "runs" / "cap"
    assert main(["analyze", "pca", str(run), "--n", "8", "--data", str(run / "data" / "test.jsonl")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    store = CaptureStore(run / "analysis" / "capture")
    assert store.n == 8
    for name in store.meta["shards"]:
        check_safetensors(store.path / name)


# -- the dashboard's root guard ------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", ["../outside", "/etc/passwd", "rim/../../outside", "escape", "rim/model/escape"]
)
def test_dashboard_refuses_paths_outside_its_root(path, tiny_runs, tmp_path):
    from dashboards import core

    root_dir = tmp_path / "runs"
    shutil.copytree(tiny_runs["rim"], root_dir / "rim")
    (tmp_path / "outside").mkdir()
    (root_dir / "escape").symlink_to(tmp_path / "outside")
    (root_dir / "rim" / "model" / "escape").symlink_to(tmp_path / "outside")
    root = core.Root.of(str(root_dir))
    with pytest.raises(core.OutsideRoot) as err:
        core.open_by_path(root, path) if path != "rim/model/escape" else core.check_tree(
            root, root_dir / "rim"
        )
    message = str(err.value)
    assert "\n" not in message and len(message) <= MAX_LINE and "outside the runs root" in message


def test_a_remote_dashboard_warns_and_is_read_only_unless_actions_are_allowed(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(os, "execv", lambda path, argv: launched.append(argv))
    for host, extra, read_only in [
        ("127.0.0.1", [], False),
        ("::1", [], False),
        ("localhost", [], False),
        ("0.0.0.0", ["--allow-remote"], True),
        ("192.168.1.5", ["--allow-remote", "--allow-actions"], False),
    ]:
        assert main(["dashboard", str(tmp_path), "--host", host, *extra]) == 0
        err = capsys.readouterr().err
        assert ("--read-only" in launched[-1]) == read_only, host
        assert ("anyone who can reach this machine" in err) == bool(extra), err
