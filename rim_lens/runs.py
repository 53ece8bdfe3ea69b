"""Run directories: `runs/<name>/` with config, model, log, metrics, predictions and status."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rim_lens import artefacts
from rim_lens.artefacts import PRODUCERS
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write_json, read_jsonl


class Run:
    """A run directory and the artefacts in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_dir(self) -> Path:
        return self.path / artefacts.MODEL

    @property
    def analysis_dir(self) -> Path:
        return self.path / artefacts.ANALYSIS

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def require(self, name: str) -> Path:
        """The artefact's path, or a RunError naming the command that produces it."""
        path = self.path / name
        if not path.exists():
            fix = PRODUCERS.get(name.split("/")[0], "").format(run=self.path)
            hint = f"; produce it with `{fix}`" if fix else ""
            raise RunError(f"{self.path}: run has no {name}{hint}")
        return path

    def read_json(self, name: str) -> Any:
        path = self.require(name)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunError(f"{path}: corrupt JSON ({err})") from None

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def status(self) -> dict:
        return self.read_json(artefacts.STATUS) if self.exists(artefacts.STATUS) else {"status": "unknown"}

    def mark(self, status: str, **info: Any) -> None:
        """Record the run's state: running, completed or failed (with the error)."""
        self.write_json(
            artefacts.STATUS, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        )

    def log(self, record: dict) -> None:
        with open(self.path / artefacts.TRAIN_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        return read_jsonl(self.require(artefacts.TRAIN_LOG))


def open_run(path: str | Path) -> Run:
    """An existing run directory (RunError if it is not one)."""
    run = Run(path)
    if not run.path.is_dir():
        raise RunError(f"{path}: no such run directory")
    if not (run.exists(artefacts.CONFIG) or run.exists(artefacts.MODEL)):
        raise RunError(f"{path}: not a rim-lens run (no config.yaml or model/)")
    return run
