"""What every dashboard page shares: the runs root and its guard, run discovery, cached loaders,
and the way a missing or corrupt artefact is reported (what is missing and the `rim-lens`
command that produces it, never a traceback).

The dashboard reads only inside the runs root it was given: every run directory and every file
is resolved (symlinks and `..` included) and refused if it lands outside the root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st
import yaml

from rim_lens import artefacts
from rim_lens.analysis.registry import analyses, analysis_of
from rim_lens.artefacts import PRODUCERS
from rim_lens.errors import RimLensError, RunError
from rim_lens.fileio import read_jsonl, read_text
from rim_lens.methods import block_methods
from rim_lens.model.memory import SPEC_FILENAME
from rim_lens.runs import Run

ENV_RUNS = "RIM_LENS_RUNS"
DEFAULT_RUNS = "runs"


class OutsideRoot(RunError):
    """A path that resolves outside the runs root."""


# -- the runs root -------------------------------------------------------------------------------
def runs_argument(argv: list[str] | None = None) -> str:
    """The runs directory: `--runs DIR` after `--` on the streamlit command line, else the
    RIM_LENS_RUNS environment variable, else `runs`."""
    argv = sys.argv[1:] if argv is None else argv
    if "--runs" in argv or any(a.startswith("--runs=") for a in argv):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--runs")
        known, _ = parser.parse_known_args(argv)
        if known.runs:
            return known.runs
    return os.environ.get(ENV_RUNS) or DEFAULT_RUNS


def read_only_argument(argv: list[str] | None = None) -> bool:
    """Whether the page may start analyses: `--read-only` after `--` on the streamlit command line
    (set by `rim-lens dashboard` for a non-loopback --host without --allow-actions)."""
    argv = sys.argv[1:] if argv is None else argv
    return "--read-only" in argv


@dataclass(frozen=True)
class Root:
    """The runs root as the user gave it (`shown`, for commands) and resolved (`path`)."""

    shown: str
    path: Path

    @classmethod
    def of(cls, given: str) -> Root:
        path = Path(given).expanduser().resolve()
        # Commands name paths as the user gave the root, unless that needs ".." to get there.
        shown = str(path) if ".." in Path(given).parts else given.rstrip("/") or "/"
        return cls(shown, path)

    def inside(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the root) resolved; OutsideRoot if it escapes the root."""
        p = Path(path)
        resolved = (p if p.is_absolute() else self.path / p).resolve()
        if resolved != self.path and not resolved.is_relative_to(self.path):
            raise OutsideRoot(
                f"{path}: refused, it resolves to {resolved}, outside the runs root {self.path}"
            )
        return resolved

    def display(self, path: Path) -> str:
        """How to name a path under the root in a command: the root as given, then the rest."""
        path = Path(path)
        try:
            rel = path.relative_to(self.path)  # as found under the root, links not followed
        except ValueError:
            rel = path.resolve().relative_to(self.path)
        return str(Path(self.shown) / rel) if str(rel) != "." else self.shown


def is_run_dir(path: Path) -> bool:
    return (path / artefacts.CONFIG).is_file() or (path / artefacts.MODEL).is_dir()


@dataclass(frozen=True)
class RunInfo:
    """One run found under the root."""

    name: str  # path relative to the root, e.g. demo/rim
    path: Path  # resolved
    shown: str  # as it is named in commands, e.g. runs/demo/rim


def discover(root: Root) -> tuple[list[RunInfo], list[str]]:
    """Every run directory under the root (a run is a directory with config.yaml or model/),
    and messages for directories refused because they lead outside the root."""
    runs, refused = [], []
    if is_run_dir(root.path):  # the root is itself one run
        return [RunInfo(".", root.path, root.shown)], refused
    for dirpath, dirnames, _ in os.walk(root.path, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            child = here / d
            if child.is_symlink():
                dirnames.remove(d)  # never walked into; listed only if it stays inside the root
                try:
                    target = root.inside(child)
                except OutsideRoot:
                    refused.append(
                        f"{root.display(child)}: a link to {child.resolve()}, outside the runs root; ignored"
                    )
                    continue
                if is_run_dir(target):
                    runs.append(RunInfo(child.relative_to(root.path).as_posix(), target, root.display(child)))
        if here != root.path and is_run_dir(here):
            runs.append(RunInfo(here.relative_to(root.path).as_posix(), here.resolve(), root.display(here)))
            dirnames[:] = []  # a run's own folders (model/, analysis/, data/) hold no runs
    runs.sort(key=lambda r: r.name)
    return runs, refused


def check_tree(root: Root, run_dir: Path) -> None:
    """OutsideRoot if any file or folder of a run is a link leading outside the root."""
    for dirpath, dirnames, filenames in os.walk(run_dir, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                try:
                    root.inside(p)
                except OutsideRoot:
                    raise OutsideRoot(
                        f"{root.display(p)}: refused, a link to {p.resolve()} outside the runs root"
                    ) from None


def open_by_path(root: Root, text: str) -> RunInfo:
    """A run named by the user (relative to the root, or absolute inside it)."""
    path = root.inside(text.strip())
    if not path.is_dir():
        raise RunError(f"{text}: no such run directory under {root.shown}")
    if not is_run_dir(path):
        raise RunError(f"{text}: not a rim-lens run (no config.yaml or model/)")
    check_tree(root, path)
    return RunInfo(path.relative_to(root.path).as_posix() or ".", path, root.display(path))


# -- messages ------------------------------------------------------------------------------------
def command(text: str) -> None:
    """A command the user can copy."""
    st.code(text, language="bash")


@contextmanager
def section(what: str = "") -> Iterator[None]:
    """Show a RimLensError as a warning (its message names the fix) and any other error as one
    line, never a traceback."""
    try:
        yield
    except RimLensError as err:
        st.warning(f"{what + ': ' if what else ''}{err}")
    except Exception as err:  # noqa: BLE001 - the dashboard must keep running
        st.error(f"{what + ': ' if what else ''}{type(err).__name__}: {err}")


def missing(run: RunInfo, artefact: str, cmd: str, detail: str = "") -> None:
    """Say that `artefact` is missing from the run and how to produce it."""
    st.info(f"{run.shown} has no {artefact}{' (' + detail + ')' if detail else ''}. Produce it with:")
    command(cmd)


def producer(run: RunInfo, name: str) -> str:
    fix = PRODUCERS.get(name.split("/")[0], "")
    return fix.format(run=run.shown)


def stamp(path: Path) -> int:
    """Modification time (ns) of a file or folder (0 if missing): part of every cache key, so
    an artefact rewritten by an analysis is read again."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def tree_stamp(path: Path) -> int:
    """Latest modification time under a folder (for caches of whole folders: model/, capture/)."""
    latest = stamp(path)
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            latest = max(latest, stamp(Path(dirpath) / f))
    return latest


# -- cached readers (keyed by path and modification time) ----------------------------------------
@st.cache_data(show_spinner=False, max_entries=256)
def _read_json(path: str, mtime: int) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: corrupt JSON ({err})") from None


@st.cache_data(show_spinner=False, max_entries=64)
def _read_jsonl(path: str, mtime: int) -> list[dict]:
    return read_jsonl(path)


@st.cache_data(show_spinner=False, max_entries=128)
def _read_parquet(path: str, mtime: int):
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise RunError(f"{path}: corrupt table ({type(err).__name__}: {err})") from None


@st.cache_data(show_spinner=False, max_entries=64)
def _read_yaml(path: str, mtime: int) -> dict:
    try:
        return yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as err:
        raise RunError(f"{path}: corrupt YAML ({err})") from None


def artefact(root: Root, run: RunInfo, name: str) -> Path | None:
    """The path of `name` inside the run (guarded), or None if it does not exist."""
    path = run.path / name
    if not path.exists() and not path.is_symlink():
        return None
    return root.inside(path)


def read(root: Root, run: RunInfo, name: str) -> Any:
    """An artefact of the run (json, jsonl, parquet, yaml by suffix); None if missing;
    RunError naming the fix if corrupt."""
    path = artefact(root, run, name)
    if path is None:
        return None
    reader = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".yaml": _read_yaml}[
        path.suffix
    ]
    try:
        return reader(str(path), stamp(path))
    except RunError as err:
        analysis = name.startswith(f"{artefacts.ANALYSIS}/")
        fix = f"rim-lens analyze {analysis_name(name)} {run.shown}" if analysis else producer(run, name)
        raise RunError(f"{err}" + (f"; produce it again with `{fix}`" if fix else "")) from None


def analyses_of(root: Root, run: RunInfo) -> list[dict]:
    """Every declared analysis (`rim_lens.analysis.registry`, plugins' too): what it does, whether the
    run holds what it writes, and the command that writes it."""
    folder = artefact(root, run, artefacts.ANALYSIS)
    written = {p.name.split(".")[0] for p in folder.iterdir()} if folder and folder.is_dir() else set()
    return [
        {
            "analysis": a.name,
            "what it does": a.summary,
            "written": bool(written & set(a.stems)),
            "command": f"rim-lens analyze {a.name} {run.shown}",
        }
        for a in analyses().values()
    ]


def analysis_name(name: str) -> str:
    """The analysis that writes `analysis/<name>` (e.g. probe_values.parquet -> probe,
    capture/meta.json -> capture)."""
    return analysis_of(name.removeprefix(f"{artefacts.ANALYSIS}/").split("/")[0].split(".")[0])


# -- run facts -----------------------------------------------------------------------------------
UNREADABLE = "unreadable"  # the status of a run whose files cannot be summarised


def run_summary(root: Root, run: RunInfo) -> dict:
    """Method, task, model size and status of a run, from its config, memory spec and status.
    `readable` is False, and `error` says why, when some of these files cannot be read (status
    `unreadable` when none can): one malformed run must not hide the others."""
    row: dict = {
        "run": run.name,
        "method": None,
        "task": None,
        "model": None,
        "K": None,
        "M": None,
        "status": "unknown",
        "error": "",
        "accuracy": None,
        "readable": True,
    }
    try:
        problems = _summarise(root, run, row)
    except Exception as err:  # noqa: BLE001 - any damage means the same here: say which run and why
        problems = [
            str(err) if isinstance(err, RimLensError) else f"{run.shown}: {type(err).__name__}: {err}"
        ]
        row["status"] = UNREADABLE
    if problems:
        row["error"] = "; ".join([row["error"], *problems]).strip("; ")
        row["readable"] = False
    return row


def _mapping(value: Any, path: Path) -> dict:
    """`value` if it is a mapping (or missing: {}); RunError naming the file otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _summarise(root: Root, run: RunInfo, row: dict) -> list[str]:
    """Fill `row` from the run's files; the problems met reading them."""
    problems = []
    try:
        cfg = _mapping(read(root, run, artefacts.CONFIG), run.path / artefacts.CONFIG)
    except RunError as err:
        cfg, problems = {}, [str(err)]
    model = _mapping(cfg.get("model"), run.path / artefacts.CONFIG)
    row["method"] = cfg.get("method")
    row["task"] = (cfg.get("task") or {}).get("name")
    if model.get("pretrained"):
        row["model"] = f"pretrained {Path(str(model['pretrained'])).name}"
    elif model:
        from rim_lens.model.checkpoints import PRESETS

        layers, width, _ = PRESETS.get(model.get("preset"), (None, None, None))
        size = f" ({layers} layers, width {width})" if layers else ""
        row["model"] = f"{model.get('arch', '?')} {model.get('preset', '?')}{size}"
    mem = _mapping(cfg.get("memory"), run.path / artefacts.CONFIG)
    if row["method"] in block_methods():
        row["K"], row["M"] = mem.get("K"), mem.get("M")
    try:
        # Run.status() says `interrupted` for a run whose training process is gone.
        status = Run(run.path).status() if artefact(root, run, artefacts.STATUS) else None
        if status:
            row["status"] = status.get("status", "unknown")
            row["error"] = status.get("error", "")
            row["method"] = row["method"] or status.get("method")
    except RunError as err:
        row["status"], problems = "corrupt status.json", problems + [str(err)]
    try:
        metrics = _mapping(read(root, run, artefacts.METRICS), run.path / artefacts.METRICS)
        row["accuracy"] = metrics.get("accuracy")
    except RunError as err:
        problems.append(str(err))
    return problems


def uses_blocks(root: Root, run: RunInfo, methods: tuple[str, ...] | None = None) -> bool:
    """Whether the run's method is one of `methods` (default: the methods with memory blocks);
    False for a run whose spec and config cannot be read."""
    for name in (f"{artefacts.MODEL}/{SPEC_FILENAME}", artefacts.CONFIG):
        try:
            found = read(root, run, name)
        except (RunError, OSError, ValueError):
            continue
        if isinstance(found, dict) and found.get("method"):
            return found["method"] in (block_methods() if methods is None else methods)
    return False


def siblings(runs: list[RunInfo], run: RunInfo) -> list[RunInfo]:
    """Runs in the same parent folder (the baselines trained beside it), the run included."""
    return [r for r in runs if r.path.parent == run.path.parent]


# -- models (cached per run and checkpoint time) --------------------------------------------------
@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _lab(run_dir: str, model_stamp: int, data_stamp: int):
    import torch

    from rim_lens.analysis.lab import Lab

    torch.set_grad_enabled(False)
    return Lab.open(run_dir, backend="hf", n=None)


_LOCKS: dict[int, threading.Lock] = {}


def model_lock(lab) -> threading.Lock:
    """One lock per loaded model: interventions hook into the shared model, so two browser
    sessions must not run it at the same time."""
    return _LOCKS.setdefault(id(lab.model), threading.Lock())


def lab(root: Root, run: RunInfo):
    """A `rim_lens.Lab` of the run (model, tokenizer, spec, task, builder, hf backend and all its
    test examples), loaded once per checkpoint and data file."""
    check_tree(root, run.path)
    if artefact(root, run, artefacts.MODEL) is None:
        raise RunError(f"{run.shown}: run has no model; produce it with `rim-lens train RECIPE`")
    held_out = artefacts.split_path(run.path, "test")
    name = held_out.relative_to(run.path).as_posix()
    if artefact(root, run, name) is None:
        raise RunError(
            f"{run.shown}: run has no {name} (the test set); produce it with `rim-lens train RECIPE`"
        )
    return _lab(str(run.path), tree_stamp(run.path / artefacts.MODEL), stamp(held_out))
