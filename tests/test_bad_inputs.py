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
from functools import partial
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


def edit_state(change: Callable[[dict], None], checksum: bool = False) -> Callable[[Path], None]:
    """runs/int's checkpoint/state.json edited by `change`; with `checksum`, sha256.json made to
    match the edit (so that only the schema can catch it)."""

    def make(ws: Path) -> None:
        ckpt = ws / "runs" / "int" / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text())
        change(state)
        (ckpt / "state.json").unlink()
        (ckpt / "state.json").write_text(json.dumps(state))
        if checksum:
            sums = json.loads((ckpt / "sha256.json").read_text())
            sums["state.json"] = hashlib.sha256((ckpt / "state.json").read_bytes()).hexdigest()
            (ckpt / "sha256.json").unlink()
            (ckpt / "sha256.json").write_text(json.dumps(sums))

    return make


def position(**changes: int) -> Callable[[dict], None]:
    return lambda state: state["position"].update(
        {k: state["position"][k] + v if k == "step" else v for k, v in changes.items()}
    )


def prosqa_other_option(ws: Path) -> None:
    """A ProsQA record whose answer and last step name the option the question's facts do not
    lead to (the proof's last step is no fact of the question)."""
    record = json.loads((REPO / "data" / "prosqa" / "valid.json").read_text())[0]
    names = record["idx_to_symbol"]
    wrong = names[record["neg_target"]]
    record["answer"] = f"{names[record['root']]} is a {wrong}."
    record["steps"][-1] = record["steps"][-1].rsplit(" ", 1)[0] + f" {wrong}."
    (ws / "x.json").write_text(json.dumps([record]))


REPO = Path(__file__).resolve().parents[1]
NESTED = "[" * 20_000 + "]" * 20_000

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
        "gsm8k-wrong-step",
        "data validate {ws}/x.txt",
        "x.txt:1: expected '<<2+2=4>>' (the step's arithmetic), got '<<2+2=5>>'",
        write("x.txt", "How much is two and two?||<<2+2=5>> #### 7\n"),
    ),
    Case(
        "prosqa-other-option",
        "data validate {ws}/x.json",
        "x.json: record 1: expected a step the question states",
        prosqa_other_option,
    ),
    Case(
        "prosqa-answer-not-reached",
        "data validate {ws}/x.json",
        "x.json: record 1: expected the answer 'Tom is a lempus.', the option the facts lead to",
        write(
            "x.json",
            json.dumps(
                [
                    {
                        "question": "Tom is a terpus. Every terpus is a lempus. Is Tom a lempus or scrompus?",
                        "steps": [],
                        "answer": "Tom is a scrompus.",
                    }
                ]
            ),
        ),
    ),
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
        "--seed: must be in 0..4294967295, got -1",
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
        "generate-more-than-memory",
        "data generate mult --option n=9 --n 1000000000000 --out {ws}/g.txt",
        "mult(n=9): 1,000,000,000,000 examples take about",
    ),
    Case(
        "generate-seed-too-large",
        "data generate mult --n 3 --seed 4294967296 --out {ws}/g.txt",
        "--seed: must be in 0..4294967295, got 4294967296",
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
        "r.yaml:1: seed: must be in [0, 4294967295], got -3",
        recipe("seed: -3\n"),
    ),
    Case(
        "recipe-negative-threads",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "train.threads: must be in [1, 1024], got -1",
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
        "r.yaml:1: memory.begin: '<m>' is also memory.memory ('<m>'); the special tokens",
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
    Case(
        "name-too-many-bytes",
        "train {ws}/r.yaml --runs-dir {ws}/runs --name " + "é" * 200,
        "is 400 bytes, too long a run name: this filesystem takes at most",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-seed-2-32",
        "train --runs-dir {ws}/runs --set seed=4294967296",
        "seed: must be in [0, 4294967295]",
    ),
    Case(
        "set-threads-huge",
        "train --runs-dir {ws}/runs --set train.threads=1099511627776",
        "train.threads: must be in [1, 1024], got 1099511627776",
    ),
    Case(
        "set-positions-huge",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set model.max_positions=1000000000000",
        "model.max_positions: 1,000,000,000,000 positions need about",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-step-offset-huge",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set memory.step_offset=" + "1" + "0" * 30,
        "memory.step_offset: the memory layout alone takes",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-K-huge",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set memory.K=1000000000000",
        "memory.K: the memory layout alone takes 3,000,000,000,000 positions",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-thoughts-huge",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set method=coconut --set coconut.c=1000000000",
        "coconut.c: the memory layout alone takes",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-nested", "train --runs-dir {ws}/runs --set train.lora=" + NESTED, "nested deeper than 16 levels"
    ),
    Case(
        "set-nested-key",
        "train --runs-dir {ws}/runs --set " + ".".join(["a"] * 20_000) + "=1",
        "nested deeper than 16 levels",
    ),
    Case(
        "recipe-nested",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:1: nested deeper than 16 levels",
        recipe("train: " + NESTED + "\n"),
    ),
    Case(
        "set-memory-token-in-data",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set memory.memory='1'",
        "memory.memory: '1' occurs in the data",
        recipe(RECIPE_OK),
    ),
    Case(
        "set-answer-prefix-is-memory",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set memory.answer_prefix=<m>",
        "memory.answer_prefix: '<m>' is also memory.memory",
        recipe(RECIPE_OK),
    ),
    Case(
        "recipe-blank-token",
        "train {ws}/r.yaml --runs-dir {ws}/runs",
        "r.yaml:1: memory.begin: expected a token of 1-64 characters, not blank",
        recipe('memory: {begin: " "}\n'),
    ),
    Case(
        "recipe-decoding-past-positions",
        "train {ws}/r.yaml --runs-dir {ws}/runs --set model.max_positions=20",
        "model.max_positions: the model takes 20 positions but decoding example",
        recipe(RECIPE_OK),
    ),
    Case(
        "pretrained-missing-dir",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "model.pretrained: in/nodir: no such directory",
        both(
            lambda ws: (ws / "in").mkdir(),
            recipe(PRE_RECIPE.replace("pretrained: pre", "pretrained: in/nodir"), "sub/r.yaml"),
        ),
    ),
    Case(
        "pretrained-missing-dot-dir",
        "train {ws}/sub/r.yaml --runs-dir {ws}/runs",
        "model.pretrained: ./nodir: no such directory",
        recipe(PRE_RECIPE.replace("pretrained: pre", "pretrained: ./nodir"), "sub/r.yaml"),
    ),
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
    Case(
        "eval-K-huge",
        "eval {ws}/runs/rim --K 1000000000000",
        "the blocks alone take 3,000,000,000,000 positions",
    ),
    Case(
        "lock-is-a-symlink",
        "eval {ws}/runs/rim --K 1",
        ".rim.lock: is not a lock file of rim-lens's own",
        both(write("outside.txt", "mine"), link("runs/.rim.lock", "../outside.txt")),
    ),
    Case(
        "lock-is-a-hard-link",
        "train {ws}/r.yaml --runs-dir {ws}/runs --name x",
        ".x.lock: is not a lock file of rim-lens's own",
        both(
            recipe(RECIPE_OK),
            write("outside.txt", "mine"),
            lambda ws: os.link(ws / "outside.txt", ws / "runs" / ".x.lock"),
        ),
    ),
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
        "checkpoint/state.json: does not match its checksum (sha256.json); pass --restart",
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
        "checkpoint/model.safetensors: does not match its checksum (sha256.json); pass --restart",
        both(
            recipe(RECIPE_OK),
            lambda ws: shutil.copy(
                ws / "runs/rim/model/model.safetensors", ws / "runs/int/checkpoint/model.safetensors"
            ),
        ),
    ),
    Case(
        "resume-state-step-edited",
        RESUME,
        "checkpoint/state.json: does not match its checksum (sha256.json); pass --restart",
        both(recipe(RECIPE_OK), edit_state(position(step=10))),
    ),
    Case(
        "resume-state-stage-edited",
        RESUME,
        "checkpoint/state.json: does not match its checksum (sha256.json); pass --restart",
        both(recipe(RECIPE_OK), edit_state(position(stage=7))),
    ),
    Case(
        "resume-state-rng-null",
        RESUME,
        "checkpoint/state.json: does not match its checksum (sha256.json); pass --restart",
        both(recipe(RECIPE_OK), edit_state(lambda s: s.update(rng=None))),
    ),
    Case(
        "resume-state-stage-rechecksummed",
        RESUME,
        "checkpoint/state.json: position stage 7, step 0 lies outside this run's stages",
        both(recipe(RECIPE_OK), edit_state(position(stage=7), checksum=True)),
    ),
    Case(
        "resume-state-rng-null-rechecksummed",
        RESUME,
        "checkpoint/state.json: rng: expected the random-number generator states",
        both(recipe(RECIPE_OK), edit_state(lambda s: s.update(rng=None), checksum=True)),
    ),
    Case(
        "resume-state-no-checksums",
        RESUME,
        "a checkpoint of an older rim-lens (no sha256.json); pass --restart",
        both(recipe(RECIPE_OK), lambda ws: (ws / "runs/int/checkpoint/sha256.json").unlink()),
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


# -- edges that need more than one command, or a fault ---------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """Exit code and stderr lines of one in-process command."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(code: int, err: list[str]) -> str:
    assert code == 2 and len(err) == 1 and err[0].startswith("rim-lens: error: "), err
    assert len(err[0]) <= MAX_LINE and "Traceback" not in err[0]
    return err[0]


def test_a_diverging_run_stops_says_so_and_its_last_checkpoint_loads(tmp_path, capsys, monkeypatch):
    from training import resume, stages, trainer

    monkeypatch.setattr(stages, "Progress", partial(stages.Progress, disable=True))  # it shares stderr
    from training.config import load_config

    (tmp_path / "r.yaml").write_text(RECIPE_OK.replace("steps: 2", "steps: 6"))
    train = ["train", tmp_path / "r.yaml", "--runs-dir", tmp_path / "runs", "--name", "d"]
    line = one_line(*run_cli(capsys, *train, "--set", "train.lr=1e308"))
    assert "training diverged at step 2 of grounding: loss nan (last finite loss" in line, line
    assert "lower train.lr (now 1e+308) and pass --restart (checkpoint kept: stage 0, step 0)" in line
    run = tmp_path / "runs" / "d"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "diverged" and "diverged at step 2" in status["error"]
    ckpt = resume.Checkpoint.read(run / "checkpoint")
    model = trainer.prepare(load_config(tmp_path / "r.yaml", ["train.lr=1e308"])).model
    ckpt.restore_model(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The resume rules: another recipe is refused, naming the change; --restart trains it again.
    line = one_line(*run_cli(capsys, *train, "--set", "train.lr=0.001"))
    assert "this diverged run was started with another recipe (train.lr: 1e+308 -> 0.001)" in line
    assert run_cli(capsys, *train, "--set", "train.lr=0.001", "--restart")[0] == 0
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_the_guard_leaves_overflowing_fp16_steps_to_the_loss_scaler():
    """fp16 needs a GPU here, so the guard's rule is checked directly: with a loss scaler a
    non-finite gradient is a skipped step, not divergence; a non-finite loss is divergence."""
    from rim_lens.methods import Stage
    from training.stages import Diverged, FiniteGuard

    stage = Stage("train", 10, 1e-3, 0.0, layout=None, weights=None)
    inf, nan, one = torch.tensor(float("inf")), torch.tensor(float("nan")), torch.tensor(1.0)
    scaled = FiniteGuard(stage, scaled=True)
    assert scaled.check(1, one, inf) == 1.0 and scaled.last == (1, 1.0)
    with pytest.raises(Diverged, match="step 2 of train: loss nan .last finite loss 1 at step 1"):
        scaled.check(2, nan, one)
    with pytest.raises(Diverged, match="step 1 of train: gradient norm inf .none before"):
        FiniteGuard(stage, scaled=False).check(1, one, inf)


def test_threads_above_the_cpus_warn_and_clamp(capsys):
    from training.trainer import threads

    cpus = len(os.sched_getaffinity(0))
    assert threads(None) == cpus and threads(1) == 1
    assert threads(1000) == cpus
    assert f"train.threads 1000 is more than the {cpus} CPUs here; using {cpus}" in capsys.readouterr().out


def test_a_hub_id_fails_at_once_offline_or_unreachable(tmp_path, capsys, monkeypatch):
    """Never a hub retry: offline (HF_HUB_OFFLINE) or without a connection, only the local cache
    is asked (local_files_only), so the lookup fails on its first try."""
    import socket

    import transformers

    asked = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    (tmp_path / "r.yaml").write_text(PRE_RECIPE.replace("pretrained: pre", "pretrained: nobody/model"))
    train = ["train", tmp_path / "r.yaml", "--runs-dir", tmp_path / "runs"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line(*run_cli(capsys, *train))
    assert (
        "cannot load 'nobody/model': not a local HF model directory, not in the local cache, and the hub is "
        in line
    )
    assert "offline (HF_HUB_OFFLINE)" in line
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert "the hub is unreachable (huggingface.co: Network is unreachable)" in one_line(
        *run_cli(capsys, *train)
    )
    assert asked == [True, True]
    assert not (tmp_path / "runs").exists()  # not even the runs folder its lock needed


def test_data_generate_refuses_what_would_not_fit(tmp_path, capsys, monkeypatch):
    """The issue's case, 10^8 examples of 9-digit operands, on a machine like this one (24 GiB
    of memory): refused at once, naming the estimate; with the memory, the disk is checked."""
    import shutil

    import psutil

    GiB = 1 << 30
    memory = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=20 * GiB))
    argv = ["data", "generate", "mult", "--option", "n=9", "--n", "100000000", "--out", tmp_path / "g.txt"]
    line = one_line(*run_cli(capsys, *argv))
    assert "mult(n=9): 100,000,000 examples take about" in line and "GiB of memory to generate" in line
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=1 << 50))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(GiB, GiB // 2, GiB // 2))
    line = one_line(*run_cli(capsys, *argv))
    assert "--n 100,000,000: the file would take about" in line and "more than the 512.0 MiB free" in line
    assert list(tmp_path.iterdir()) == []


def test_storage_errors_are_recognised_however_a_library_reports_them():
    import errno

    from safetensors import SafetensorError

    from rim_lens.fileio import storage_errno

    assert storage_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert storage_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    told = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_errno(told) == errno.ENOSPC
    assert storage_errno(OSError(errno.ENOENT, "No such file")) is None
    assert storage_errno(ValueError("bad value 28")) is None


def test_eval_keeps_every_metric_it_does_not_recompute(tiny_runs, tmp_path, capsys):
    run = clone_runs({"rim": tiny_runs["rim"]}, tmp_path)["rim"]
    before = json.loads((run / "metrics.json").read_text())
    before["note"] = "mine"
    (run / "metrics.json").write_text(json.dumps(before))
    assert run_cli(capsys, "eval", run)[0] == 0
    after = json.loads((run / "metrics.json").read_text())
    assert {"input_share", "input_share_by_layer", "train_time_s", "tokens_seen", "splits", "note"} <= set(
        after
    )
    assert after["input_share"] == before["input_share"] and after["note"] == "mine"
    assert set(before) <= set(after)


def test_sweeps_of_one_run_wait_for_each_other_and_keep_each_others_entries(tiny_runs, tmp_path, capsys):
    """Another eval holds the run (as a concurrent sweep would): this one waits, then adds its own
    entries to what the other wrote instead of the sweep.json it would have read at its start."""
    import threading
    import time

    from rim_lens.runs import RunLock

    run = clone_runs({"rim": tiny_runs["rim"]}, tmp_path)["rim"]
    other = {"K": 7, "M": 1, "split": "test", "accuracy": 0.5, "n_eval": 1}
    lock = RunLock(run, "eval").acquire()
    codes = []
    sweep = threading.Thread(target=lambda: codes.append(main(["eval", str(run), "--K", "1,2"])))
    sweep.start()
    time.sleep(1.0)
    assert sweep.is_alive() and not (run / "sweep.json").exists()  # waiting for the lock
    (run / "sweep.json").write_text(json.dumps([other]))
    lock.release()
    sweep.join(timeout=120)
    assert codes == [0]
    entries = json.loads((run / "sweep.json").read_text())
    assert [(e["K"], e["M"]) for e in entries] == [(1, 1), (2, 1), (7, 1)] and other in entries


def test_eval_refuses_a_run_a_training_is_writing(tiny_runs, tmp_path, capsys):
    from rim_lens.runs import RunLock

    run = clone_runs({"rim": tiny_runs["rim"]}, tmp_path)["rim"]
    before = fingerprint(run)
    with RunLock(run, "train"):
        line = one_line(*run_cli(capsys, "eval", run))
    assert "another `rim-lens train` is writing this run" in line
    assert fingerprint(run) == before


def test_demo_never_replaces_a_run_of_another_recipe(tmp_path, capsys):
    """The user's own completed run where the demo would put its RiM run: the demo stops before it
    writes anything, naming the run and --overwrite; the run stays byte for byte."""
    (tmp_path / "r.yaml").write_text(RECIPE_OK)
    runs = tmp_path / "runs"
    assert run_cli(capsys, "train", tmp_path / "r.yaml", "--runs-dir", runs, "--name", "rim")[0] == 0
    before = fingerprint(runs)
    demo = ["demo", "--recipe", tmp_path / "r.yaml", "--runs-dir", runs, "--methods", "rim", "--no-report"]
    demo += ["--latency-examples", "0", "--set", "train.steps=3"]
    line = one_line(*run_cli(capsys, *demo))
    assert f"{runs / 'rim'}: holds a completed run trained with another recipe (" in line
    assert "--overwrite" in line
    assert fingerprint(runs) == before
    assert run_cli(capsys, *demo, "--overwrite")[0] == 0
    assert "steps: 3" in (runs / "rim" / "config.yaml").read_text()
    after = fingerprint(runs / "rim")
    assert run_cli(capsys, *demo)[0] == 0  # the same recipe: reused, not retrained
    assert fingerprint(runs / "rim") == after


def custom_code_model(directory: Path) -> Path:
    """A tiny GPT-2 whose config names its own code (auto_map): a model with `trust_remote_code`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rim_lens.model.memory import MemorySpec
    from rim_lens.model.tokenizer import build_word_tokenizer

    directory.mkdir()
    (directory / "custom_code.py").write_text(
        "from transformers import GPT2Config, GPT2LMHeadModel\n\n\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'custom_gpt2'\n\n\n"
        "class CustomLM(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
    )
    words = [str(d) for d in range(10)] + ["+", "-", "*", "mod"]
    tok = build_word_tokenizer(words, MemorySpec())
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok), **ids)
    config.model_type = "custom_gpt2"
    config.auto_map = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForCausalLM": "custom_code.CustomLM",
    }
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_a_run_trained_with_custom_code_reopens_with_trust_remote_code(tmp_path, capsys, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    custom_code_model(tmp_path / "custom")
    (tmp_path / "r.yaml").write_text(
        PRE_RECIPE.replace("pretrained: pre", f"pretrained: {tmp_path / 'custom'}, trust_remote_code: true")
    )
    assert (
        run_cli(capsys, "train", tmp_path / "r.yaml", "--runs-dir", tmp_path / "runs", "--name", "c")[0] == 0
    )
    run = tmp_path / "runs" / "c"
    assert (run / "model" / "custom_code.py").is_file()
    before = fingerprint(run)
    for command in (["eval", run], ["analyze", "pca", run, "--n", "4"]):
        line = one_line(*run_cli(capsys, *command))
        assert "the model runs Python code of its own (custom_code.py); pass --trust-remote-code" in line
    assert fingerprint(run) == before
    code, err = run_cli(capsys, "eval", run, "--trust-remote-code")
    assert code == 0 and "--trust-remote-code: Python code from" in err[0]
    assert json.loads((run / "metrics.json").read_text())["n_test"] == 8


def test_an_eval_waits_for_a_holder_that_has_not_yet_said_who_it_is(tiny_runs, tmp_path):
    """A lock taken a moment ago holds no record yet (its holder writes it right after locking):
    a second eval waits instead of taking it for a training and giving up."""
    import fcntl
    import threading
    import time

    run = clone_runs({"rim": tiny_runs["rim"]}, tmp_path)["rim"]
    fd = os.open(run.with_name(".rim.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    codes = []
    sweep = threading.Thread(target=lambda: codes.append(main(["eval", str(run), "--K", "1"])))
    sweep.start()
    time.sleep(1.0)
    assert sweep.is_alive() and codes == []
    os.close(fd)
    sweep.join(timeout=120)
    assert codes == [0] and [e["K"] for e in json.loads((run / "sweep.json").read_text())] == [1]


def test_a_read_only_folder_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    """On a read-only filesystem even removing the unwritten temporary file fails (EROFS): the
    error still names the file asked for."""
    import errno

    from rim_lens.fileio import StorageError, atomic_write_many

    def refused(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "open", refused)
    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(StorageError, match=r"/x\.json: cannot write \(Read-only file system\)"):
        atomic_write_many({tmp_path / "x.json": b"{}"})
