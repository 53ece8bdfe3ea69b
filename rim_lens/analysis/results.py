"""Typed analysis results: a table, a summary, a record of what was done, figures, and `save`.

Every `Lab` method returns one. `result.table` is a pandas DataFrame (blocks labelled 1..K),
`result.figure()` its main plotly figure, `result.save(dir)` writes `<stem>.parquet` for each
table, `<summary stem>.json` (the summary plus `record`: model and options fingerprints, see
`fingerprint`) and `<stem>.<figure>.fig.json` for each figure. `result.record` says exactly
what was done: the analysis, the selection, the intervention (`Intervention.to_dict()`), the
examples, the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rim_lens import artefacts
from rim_lens.analysis.registry import analysis_of
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write, atomic_write_json, atomic_write_text, read_json
from rim_lens.stats import Estimate, proportion


def plain(obj):
    """JSON-safe copy: NaN becomes null (strict JSON has no NaN), numpy scalars and Estimates
    become Python values and dicts."""
    if isinstance(obj, Estimate):
        return plain(obj.to_dict())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    return None if isinstance(obj, float) and math.isnan(obj) else obj


@dataclass(repr=False)
class Result:
    """What an analysis found. Subclasses set `name` and may add tables and figures."""

    table: pd.DataFrame
    summary: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    name: ClassVar[str] = ""
    summary_stem: ClassVar[str | None] = None  # default: `name`

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by file stem."""
        return {self.name: self.table}

    def figures(self) -> dict[str, go.Figure]:
        """Every figure by file stem (`<table stem>.<figure>`)."""
        return {}

    def figure(self, which: str | None = None) -> go.Figure:
        """The main figure, or the one whose name ends with `which`."""
        figs = self.figures()
        if not figs:
            raise RunError(f"{self.name}: this result has no figure")
        if which is None:
            return next(iter(figs.values()))
        found = [fig for key, fig in figs.items() if key.endswith(which)]
        if not found:
            raise RunError(f"{self.name}: no figure {which!r}; figures: {', '.join(figs)}")
        return found[0]

    def save(self, directory: str | Path) -> Path:
        """Write the tables, the summary with its record, and the figures into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for stem, table in self.tables().items():
            atomic_write(out / f"{stem}.parquet", partial(table.to_parquet, index=False))
        atomic_write_json(
            out / f"{self.summary_stem or self.name}.json", plain({**self.summary, "record": self.record})
        )
        for stem, fig in self.figures().items():
            atomic_write_text(out / f"{stem}.fig.json", fig.to_json())
        return out

    def __repr__(self) -> str:
        shown = {k: v for k, v in plain(self.summary).items() if not isinstance(v, dict | list)}
        return f"{type(self).__name__}({len(self.table)} rows, {shown})"


def estimate_of(flags: np.ndarray) -> Estimate:
    return proportion(np.asarray(flags, dtype=bool))


def with_intervals(rows: list[dict], flags: np.ndarray, key: str = "accuracy") -> None:
    """Add key, key_lo, key_hi (Wilson) to each row from its flags [rows, examples]."""
    for row, f in zip(rows, flags):
        e = estimate_of(f)
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = e.value, e.lo, e.hi


# -- saved results --------------------------------------------------------------------------------
def _missing(run_dir: str | Path, stem: str) -> RunError:
    what = analysis_of(stem)
    return RunError(f"{run_dir}: no {what} analysis; produce it with `rim-lens analyze {what} {run_dir}`")


def load_table(run_dir: str | Path, stem: str) -> pd.DataFrame:
    """A saved analysis table; RunError naming the command that produces it if missing."""
    path = Path(run_dir) / artefacts.ANALYSIS / f"{stem}.parquet"
    if not path.exists():
        raise _missing(run_dir, stem)
    return pd.read_parquet(path)


def load_summary(run_dir: str | Path, stem: str) -> dict:
    """A saved analysis summary (with its `record`); RunError naming the command if missing."""
    path = Path(run_dir) / artefacts.ANALYSIS / f"{stem}.json"
    if not path.exists():
        raise _missing(run_dir, stem)
    return read_json(
        path, RunError, f"produce it again with `rim-lens analyze {analysis_of(stem)} {run_dir}`"
    )
