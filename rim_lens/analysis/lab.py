"""An analysis session over one trained run: its checkpoint, held-out examples and a backend.

`Lab.open(run_dir)` is what every `rim-lens analyze` command and notebook starts from; results
are written under `runs/<name>/analysis/`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rim_lens.analysis.backends import Backend, make_backend
from rim_lens.analysis.capture import CaptureStore, capture
from rim_lens.analysis.interventions import Selection, select
from rim_lens.data import Example, read_examples
from rim_lens.data.tasks import Task, get_task
from rim_lens.errors import RunError
from rim_lens.fileio import atomic_write_json, atomic_write_text
from rim_lens.model.checkpoints import load_checkpoint
from rim_lens.model.layouts import SequenceBuilder
from rim_lens.model.memory import MemorySpec
from rim_lens.runs import Run, open_run


@dataclass
class Lab:
    run: Run
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: MemorySpec
    task: Task
    builder: SequenceBuilder
    backend: Backend
    examples: list[Example]

    @classmethod
    def open(
        cls, run_dir: str | Path, backend: str = "hf", n: int | None = 200, data: str | Path | None = None
    ) -> Lab:
        """Load a run's checkpoint and its first `n` held-out examples (or those in `data`)."""
        run = open_run(run_dir)
        model, tokenizer, spec = load_checkpoint(run.require("model"))
        if not spec.uses_blocks:
            raise RunError(f"{run.path}: a {spec.method} model has no memory blocks to analyse")
        task = get_task(spec.task, **_task_options(run))
        examples, _ = read_examples(
            data or run.require("data/eval.jsonl"), task.name, task_options=task.options
        )
        examples = examples[:n] if n else examples
        be = make_backend(backend, model, tokenizer, run.model_dir)
        return cls(
            run, model, tokenizer, spec, task, SequenceBuilder(tokenizer, spec, task.join_steps), be, examples
        )

    @property
    def out(self) -> Path:
        self.run.analysis_dir.mkdir(parents=True, exist_ok=True)
        return self.run.analysis_dir

    def select(self, layers=None, blocks=None, slots=None) -> Selection:
        return select(self.backend, self.spec.K, self.spec.M, layers, blocks, slots)

    def capture(self, attn: bool = False, refresh: bool = False) -> CaptureStore:
        """The capture of this lab's examples, reused from `analysis/capture` when it matches."""
        path = self.out / "capture"
        if not refresh and (path / "meta.json").exists():
            store = CaptureStore(path)
            ids = [r["id"] for r in store.examples]
            if ids == [ex.id for ex in self.examples] and (not attn or store.meta["attn_layers"]):
                return store
        return capture(
            self.model,
            self.tokenizer,
            self.spec,
            self.examples,
            path,
            self.backend,
            attn=attn,
            task_options=self.task.options,
        )

    def save(
        self,
        name: str,
        table: pd.DataFrame | None = None,
        summary: dict | None = None,
        figures: dict | None = None,
    ) -> Path:
        """Write `analysis/<name>.parquet`, `<name>.json` and `<name>.<figure>.fig.json` (plotly)."""
        if table is not None:
            table.to_parquet(self.out / f"{name}.parquet", index=False)
        if summary is not None:
            atomic_write_json(self.out / f"{name}.json", _plain(summary))
        for key, fig in (figures or {}).items():
            atomic_write_text(self.out / f"{name}.{key}.fig.json", fig.to_json())
        return self.out / name


def _plain(obj):
    """JSON-safe copy: NaN becomes null (strict JSON has no NaN), numpy scalars become Python."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def _task_options(run: Run) -> dict:
    """The task options the run was trained with (e.g. mult's n), from its resolved config."""
    config = yaml.safe_load(run.require("config.yaml").read_text()) or {}
    return (config.get("task") or {}).get("options") or {}


def load_result(run_dir: str | Path, name: str) -> pd.DataFrame:
    """A saved analysis table; RunError naming the command that produces it if missing."""
    path = Path(run_dir) / "analysis" / f"{name}.parquet"
    if not path.exists():
        raise RunError(f"{run_dir}: no {name} analysis; produce it with `rim-lens analyze {name} {run_dir}`")
    return pd.read_parquet(path)


def load_summary(run_dir: str | Path, name: str) -> dict:
    path = Path(run_dir) / "analysis" / f"{name}.json"
    if not path.exists():
        raise RunError(f"{run_dir}: no {name} analysis; produce it with `rim-lens analyze {name} {run_dir}`")
    return json.loads(path.read_text())
