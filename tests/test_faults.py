"""Faults mid-write: `train`, `eval` and `analyze report` killed with SIGKILL at 20 or more
moments each, a file-size limit (the disk full for one file), and a runs directory that may not
be written. After every fault no file a reader sees is half-written, a rerun of the same command
reaches the result an undisturbed run reaches, and a refused write is one line with the earlier
state intact.

The commands run in children of one forking server (tests/faults.py): a child counts its writes
inside the workspace and kills itself at moment k, halfway through a file when the moment is a
write. The moments are drawn with a fixed seed from those an undisturbed run makes, and include
every checkpoint write that an interrupted training can meet: the safetensors files, state.json,
the checksums, and the two renames that put a new checkpoint in place.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import stat
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import yaml
from faults import Done, Server
from fixtures import once_per_session
from safetensors.torch import load_file

from rim_lens.fileio import check_safetensors
from training import resume as resumption

RECIPE = (
    "method: rim\ntask: {name: modchain, options: {length: 2}}\ndata: {train: 32, val: 8, test: 8}\n"
    "model: {preset: tiny, max_positions: 64}\nmemory: {K: 2, M: 1}\n"
    "train: {steps: 9, batch_size: 8, threads: 1, checkpoint_every: 3, log_every: 2, eval_every: 6}\n"
    "eval: {latency_examples: 0}\n"
)
TRAIN = ["train", "r.yaml", "--runs-dir", "runs", "--name", "t"]
EVALS = (["eval", "runs/t"], ["eval", "runs/t", "--K", "1,2,3"])
REPORT = ["analyze", "report", "runs/t", "--n", "8", "--layers", "1"]
MOMENTS = 20  # kills per command, at least
SEED = 22


@pytest.fixture(scope="module")
def server():
    with Server() as s:
        yield s


def workspace(path: Path, run: Path | None = None) -> Path:
    """A folder holding the recipe and, if given, a copy of a completed run as runs/t."""
    path.mkdir(parents=True)
    (path / "r.yaml").write_text(RECIPE)
    if run is not None:
        shutil.copytree(run, path / "runs" / "t")
    return path


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> dict:
    """What undisturbed commands do (made once per session, shared by pytest-xdist workers): the
    trained run, every command's moments, and the run each command leaves."""
    paths = once_per_session(tmp_path_factory, "fault_reference", partial(_reference, server))
    out = {name: json.loads(path.read_text()) for name, path in paths.items() if path.suffix == ".json"}
    out["run"] = paths["run"]
    for name in ("train", "eval0", "eval1", "report"):
        out[f"{name}-result"] = result(paths[f"{name}-run"])
    return out


def _reference(server: Server, root: Path) -> dict[str, Path]:
    ws = workspace(root / "train")
    trained = server.run(TRAIN, ws)
    assert trained.code == 0, trained.err
    run = ws / "runs" / "t"
    made = {"run": run, "train-run": run}
    moments_of = {"train": trained.events}
    for name, argv in (("eval0", EVALS[0]), ("eval1", EVALS[1]), ("report", REPORT)):
        copy = workspace(root / name, run)
        done = server.run(argv, copy)
        assert done.code == 0, done.err
        made[f"{name}-run"], moments_of[name] = copy / "runs" / "t", done.events
    for name, events in moments_of.items():
        made[name] = root / f"{name}.json"
        made[name].write_text(json.dumps(events))
    return made


# -- what a reader may see, and what a run ends with --------------------------------------------------
def visible(root: Path) -> list[Path]:
    """Every file a reader would open: none under a name starting with "." (rim-lens's staging)."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def assert_no_torn_file(root: Path) -> None:
    """Every visible file is whole: JSON, JSON lines, YAML, safetensors and parquet parse."""
    for path in visible(root):
        where = str(path.relative_to(root))
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            text = path.read_text()
            assert not text or text.endswith("\n"), f"{where}: a half line"
            [json.loads(line) for line in text.splitlines() if line.strip()]
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.suffix == ".parquet":
            pd.read_parquet(path)


def stable(obj):
    """`obj` without what depends on the clock (times, rates)."""
    if isinstance(obj, dict):
        timed = ("time", "seconds", "per_s", "elapsed")
        return {k: stable(v) for k, v in obj.items() if not (any(t in k for t in timed) or k.endswith("_s"))}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj  # NaN != NaN


def result(run: Path) -> dict:
    """What a run holds that a command computes: weights, metrics, predictions, sweep, report."""
    out: dict = {}
    for path in visible(run):
        name = str(path.relative_to(run))
        if name.startswith(("data/", "model/tokenizer")) or name in ("status.json", "train_log.jsonl"):
            continue  # inputs, or records of how the run went (times, resumes)
        if path.suffix == ".safetensors":
            out[name] = {k: v.tolist() for k, v in load_file(path).items()}
        elif path.suffix == ".json":
            out[name] = stable(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[name] = path.read_text()
        elif path.suffix == ".parquet":
            out[name] = stable(pd.read_parquet(path).to_dict("list"))
    return out


def one_error_line(done: Done) -> str:
    lines = done.err.strip().splitlines()
    assert done.code == 2 and len(lines) == 1 and "Traceback" not in done.err, done.err
    assert lines[0].startswith("rim-lens: error: ")
    return lines[0]


def moments(events: list[list[str]], must: list[int], n: int = MOMENTS) -> list[int]:
    """`must` and random other moments (1-based), `n` at least, in order."""
    picked = set(must)
    rest = [k for k in range(1, len(events) + 1) if k not in picked]
    picked |= set(random.Random(SEED).sample(rest, max(0, n - len(picked))))
    assert len(picked) >= n
    return sorted(picked)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- SIGKILL -------------------------------------------------------------------------------------------
def test_train_killed_at_20_moments_resumes_to_the_same_run(server, reference, tmp_path):
    events = reference["train"]
    checkpoint = [k for k, (op, path) in enumerate(events, 1) if "checkpoint" in path]
    # The second of a checkpoint's two renames: the old one moved aside, the new one not yet in place.
    between = [
        k + 1 for k, (op, path) in enumerate(events, 1) if op == "rename" and path.endswith("/checkpoint")
    ]
    assert len(between) >= 2
    chosen = moments(events, between[:2] + random.Random(SEED).sample(checkpoint, 8))
    for k in chosen:
        ws = workspace(tmp_path / f"k{k}")
        killed = server.run(TRAIN, ws, kill_at=k)
        assert killed.killed, f"moment {k} {events[k - 1]}: {killed.err}"
        assert_no_torn_file(ws)
        again = server.run(TRAIN, ws)
        if again.code == 2:  # killed after the run completed: it says so, and holds the result
            assert "already holds a trained run" in one_error_line(again), events[k - 1]
        else:
            assert again.code == 0, f"moment {k} {events[k - 1]}: {again.err}"
        assert result(ws / "runs" / "t") == reference["train-result"], f"moment {k} {events[k - 1]}"
        if k in between:  # resumed from the checkpoint put back, not from step 0 (no data rewritten)
            assert not any(path.startswith("runs/t/data") for _, path in again.events), again.events


@pytest.mark.parametrize("which", [0, 1], ids=["rescore", "sweep"])
def test_eval_killed_at_moments_leaves_whole_files_and_reruns_to_the_same_results(
    which, server, reference, tmp_path
):
    events, argv = reference[f"eval{which}"], EVALS[which]
    chosen = moments(events, [], n=len(events))  # every one of its moments
    for k in chosen:
        ws = workspace(tmp_path / f"k{k}", reference["run"])
        before = result(ws / "runs" / "t")
        killed = server.run(argv, ws, kill_at=k)
        assert killed.killed, f"moment {k} {events[k - 1]}: {killed.err}"
        assert_no_torn_file(ws)
        # Each file is the one before or the one after (a sweep writes budget by budget).
        now, after = result(ws / "runs" / "t"), reference[f"eval{which}-result"]
        for name in set(now) | set(before) | set(after):
            assert now.get(name) in (before.get(name), after.get(name)), (name, events[k - 1])
        again = server.run(argv, ws)
        assert again.code == 0, f"moment {k} {events[k - 1]}: {again.err}"
        assert result(ws / "runs" / "t") == reference[f"eval{which}-result"], f"moment {k} {events[k - 1]}"


def test_eval_moments_add_up_to_20(reference):
    """The two eval commands above are killed at 20 or more moments between them."""
    assert len(reference["eval0"]) + len(reference["eval1"]) >= MOMENTS


def test_report_killed_at_20_moments_reruns_to_the_same_report(server, reference, tmp_path):
    """One workspace, kills in order: first while the capture is written (each rerun captures
    again), then, the capture complete, while the analyses and the report are written (at the
    moments of a report that finds its capture in place: the rerun between the two phases)."""
    fresh = reference["report"]
    done = next(
        k for k, (op, path) in enumerate(fresh, 1) if op == "replace" and "capture/.meta.json" in path
    )
    ws = workspace(tmp_path / "ws", reference["run"])

    def kill_then_rerun(events: list, n: int) -> Done:
        for k in moments(events, [], n=n):
            killed = server.run(REPORT, ws, kill_at=k)
            assert killed.killed, f"moment {k} {events[k - 1]}: {killed.err}"
            assert_no_torn_file(ws)
        rerun = server.run(REPORT, ws)
        assert rerun.code == 0, rerun.err
        assert result(ws / "runs" / "t") == reference["report-result"]
        return rerun

    # Half the kills in the capture, or every moment of it if it has fewer; the rest after it.
    first = min(MOMENTS // 2, done - 1)
    rerun = kill_then_rerun(fresh[: done - 1], first)
    kill_then_rerun(rerun.events, MOMENTS - first)  # the capture in place from here on


# -- the disk full, a read-only runs directory ---------------------------------------------------------
def test_a_full_disk_gives_one_line_and_keeps_the_checkpoint_before(server, reference, tmp_path):
    """A file-size limit between the weights (425 kB) and the optimizer state (twice that): the
    first checkpoint (no optimizer state yet) is written, the second is refused."""
    ws = workspace(tmp_path / "ws")
    size = (reference["run"] / "model" / "model.safetensors").stat().st_size
    full = server.run(TRAIN, ws, fsize=size * 3 // 2)
    line = one_error_line(full)
    assert "runs/t/checkpoint: cannot write (File too large)" in line and "run the same command again" in line
    ckpt = resumption.Checkpoint.read(ws / "runs" / "t" / "checkpoint")  # intact, and it loads
    assert ckpt.state.position == resumption.Position()
    assert json.loads((ws / "runs" / "t" / "status.json").read_text())["status"] == "failed"
    again = server.run(TRAIN, ws)
    assert again.code == 0, again.err
    assert result(ws / "runs" / "t") == reference["train-result"]


def test_eval_on_a_full_disk_changes_nothing(server, reference, tmp_path):
    ws = workspace(tmp_path / "ws", reference["run"])
    before = files(ws)
    full = server.run(list(EVALS[0]), ws, fsize=1024)  # predictions.jsonl is longer
    assert "cannot write (File too large)" in one_error_line(full)
    assert files(ws) == before


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "runs/t", "--data", "runs/t/data/test.jsonl"],
        ["eval", "runs/t"],
        ["train", "r.yaml", "--runs-dir", "runs", "--name", "new"],
    ],
    ids=["eval-data", "eval", "train-new-run"],
)
def test_a_read_only_runs_directory_gives_one_line_and_changes_nothing(argv, server, reference, tmp_path):
    ws = workspace(tmp_path / "ws", reference["run"])
    read_only(ws / "runs")
    before = files(ws)
    try:
        done = server.run(argv, ws, read_only=True)
        line = one_error_line(done)
        assert "runs/" in line and "cannot write (Permission denied)" in line and "make it writable" in line
        assert files(ws) == before
    finally:
        for path in [ws / "runs", *(ws / "runs").rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
