"""What every analysis works on: a model, its examples, a hook backend and the sequence builder.

A `Session` holds them and the plumbing the analyses share: validated selections, cached block
states, fitted interventions, records of what was done, and the capture on disk. The analyses
take a session; `Lab` (the user's entry point, `rim_lens.analysis.lab`) is a session that opens
runs and offers every analysis as a method.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rim_lens import artefacts
from rim_lens.analysis import fingerprint
from rim_lens.analysis.backends import Backend
from rim_lens.analysis.capture import CaptureResult, CaptureStore, block_states, capture
from rim_lens.analysis.interventions import Context, Intervention
from rim_lens.analysis.registry import analysis
from rim_lens.analysis.results import plain
from rim_lens.analysis.sites import BlockStates, Selection
from rim_lens.data import Example
from rim_lens.data.tasks import Task
from rim_lens.errors import RunError
from rim_lens.model.layouts import SequenceBuilder, slot_names
from rim_lens.model.memory import MemorySpec
from rim_lens.runs import Run

Layers = Sequence[int] | None


class Session:
    """One model under analysis: `model`, `tokenizer`, `spec`, `task`, `examples`, `backend`
    ("hf", "tl" or "nnsight"), `builder`, and `run` (the run directory, if any)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: MemorySpec,
        task: Task,
        examples: Sequence[Example],
        backend: Backend,
        run: Run | None = None,
        out: str | Path | None = None,
        source: str = "",
    ) -> None:
        self.model, self.tokenizer, self.spec, self.task = model, tokenizer, spec, task
        self.examples = list(examples)
        self.backend = backend
        self.builder = SequenceBuilder(tokenizer, spec, task.join_steps)
        self.run = run
        self.source = source  # where the examples come from, e.g. runs/demo/rim/data/test.jsonl[:200]
        self._out = Path(out) if out is not None else None
        self._states: dict[tuple, BlockStates] = {}

    # -- plumbing ----------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        """Where analyses are written: the run's analysis/ (or the session's own folder)."""
        if self._out is None:
            self._out = self.run.analysis_dir if self.run else Path(tempfile.mkdtemp(prefix="rim-lens-lab-"))
        self._out.mkdir(parents=True, exist_ok=True)
        return self._out

    @cached_property
    def model_fingerprint(self) -> str:
        return fingerprint.model_fingerprint(self.model, self.spec)

    def record(
        self, analysis: str, selection: Selection | None, intervention: Intervention | None = None, **options
    ) -> dict:
        """What a result records: model and example fingerprints, backend, selection, intervention."""
        ids = [ex.id or ex.question for ex in self.examples]
        options = {
            "examples": {**fingerprint.examples_fingerprint(ids), "source": self.source},
            "backend": self.backend.name,
            "selection": selection.to_dict() if selection else None,
            "intervention": intervention.to_dict() if intervention else None,
            **options,
        }
        return fingerprint.record(analysis, self.model_fingerprint, plain(options))

    def require_blocks(self) -> None:
        """RunError if the model has no memory blocks or continuous thoughts (direct, CoT): block
        analyses refuse. A Coconut model's thought k is block k, slot 0 (`MemorySpec.latent_blocks`)."""
        if not self.spec.latent_blocks:
            raise RunError(
                f"{self.run.path if self.run else 'model'}: a {self.spec.method} model has no memory "
                "blocks to analyse (nor continuous thoughts)"
            )

    def select(
        self, layers: Layers = None, blocks: Layers = None, slots: Layers = None, readable: bool = False
    ) -> Selection:
        """A validated selection (None: all). Layers go to n_layers - 1 (what an edit of resid[l]
        can change) or, `readable`, to n_layers (the last layer's output, read by captures)."""
        self.require_blocks()
        top = self.backend.n_layers if readable else self.backend.n_layers - 1
        spec = self.spec
        return Selection.of(
            self.backend.n_layers, spec.latent_blocks, spec.block_slots, layers, blocks, slots, top
        )

    def states(self, examples: Sequence[Example] | None = None, layers: Layers = None) -> BlockStates:
        """Clean block states of `examples` (default: the session's) at `layers` (default
        0..n_layers): [examples, layers, K, M + 2, d_model], cached."""
        self.require_blocks()
        examples = self.examples if examples is None else list(examples)
        layers = list(range(self.backend.n_layers + 1)) if layers is None else sorted(set(layers))
        key = (tuple((ex.id, ex.question) for ex in examples), tuple(layers))
        if key not in self._states:
            parts = [
                block_states(self.backend, self.builder, examples[i : i + 64], layers)[0]
                for i in range(0, len(examples), 64)
            ]
            if len(self._states) >= 16:
                self._states.pop(next(iter(self._states)))
            ids = [ex.id for ex in examples]
            self._states[key] = BlockStates(
                torch.cat(parts), layers, slot_names(self.spec), ids, self.backend.n_layers
            )
        return self._states[key]

    def fit(
        self, intervention: Intervention, targets: Sequence[Example], selection: Selection
    ) -> Intervention:
        """`intervention` fitted to intervene on `targets` (it may use the session's examples)."""
        context = Context(
            list(targets), self.examples, selection, lambda exs: self.states(exs, selection.layers)
        )
        return intervention.fit(context)

    @analysis(
        stems=(artefacts.CAPTURE,),
        example="--layers 0-2 --attn",
        cli={"refresh": True},
        help={
            "attn": "also attention outputs",
            "readouts": "the greedy readout after every block too (default: on)",
            "batch_size": "examples per forward pass (default: 64)",
        },
    )
    def capture(
        self,
        layers: Layers = None,
        attn: bool = False,
        readouts: bool = True,
        refresh: bool = False,
        batch_size: int = 64,
    ) -> CaptureResult:
        """Block states of every example at `layers` (default all, 0..n_layers) on disk under
        analysis/capture, with the readout after every block; reused while its record matches
        (`refresh`: made again regardless)."""
        self.require_blocks()
        layers = list(self.select(layers, readable=True).layers)
        record = self.record(artefacts.CAPTURE, None, layers=layers, attn=attn, readouts=readouts)
        path = self.out / artefacts.CAPTURE
        store = None
        if not refresh and (path / "meta.json").exists():
            try:
                store = CaptureStore(path)
            except (RunError, OSError, ValueError):  # a damaged capture is made again
                store = None
            if store is not None and not fingerprint.matches(store.record, record):
                store = None
        if store is None:
            store = capture(
                self.backend, self.builder, self.task, self.examples, path,
                layers=layers, attn=attn, readouts=readouts, record=record, batch_size=batch_size,
            )  # fmt: skip
        table = pd.DataFrame(store.examples)[["index", "id", "question", "answer", "readouts", "correct"]]
        summary = {
            "n": store.n,
            "layers": store.layers,
            "K": store.K,
            "slots": store.slots,
            "path": str(store.path),
        }
        return CaptureResult(table, summary, store.record, store=store)
