"""Capture memory-block hidden states to disk, labelled by layer x block x slot.

A Coconut model's continuous thoughts are captured the same way: thought k is block k, with one
slot (K = its number of thoughts); "the readout after block k" is its answer after k thoughts.

States stream to safetensors shards (`shard_00000.safetensors`, ...) holding
`resid` [n, layers, K, M + 2, d_model] (and `attn` when asked), so 10,000 examples never sit
in memory at once. `examples.jsonl` stores, per example, its id, question, answer, step
values, the readout after every block and whether it was correct. `meta.json` is written last:
a capture without it is incomplete. It holds the capture's `record` (see `fingerprint`): the
model and the options it came from, so a stale capture is never reused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

# The dataclass __init__ of CaptureResult carries Result's `table: pd.DataFrame`; the API reference
# (pdoc) resolves that annotation in this module.
import pandas as pd  # noqa: F401
import plotly.graph_objects as go
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.analysis.backends import Backend
from rim_lens.analysis.results import Result, estimate_of
from rim_lens.analysis.sites import block_index, block_labels, state_index
from rim_lens.data.examples import Example
from rim_lens.data.tasks import Task
from rim_lens.errors import RunError
from rim_lens.evaluation import decode_answers
from rim_lens.fileio import atomic_write_json, atomic_write_text, check_safetensors, read_json, read_jsonl
from rim_lens.model.layouts import Role, SequenceBuilder, block_positions, slot_names
from rim_lens.progress import progress


def block_states(
    backend: Backend, builder: SequenceBuilder, examples: Seq[Example], layers: Seq[int], attn: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """States at the block positions of the inference prompts of `examples`:
    resid [n, len(layers), K, M + 2, d] and, if `attn`, attention outputs of the same layers
    below the last ([n, layers < n_layers, K, M + 2, d])."""
    batch = builder.collate([builder.prompt(ex) for ex in examples], side="left")
    attn_layers = [l for l in layers if l < backend.n_layers] if attn else []
    out = backend.forward(batch, capture=layers, capture_attn=attn_layers)
    pos = block_positions(batch)  # [B, K, S]
    rows = torch.arange(len(examples))[:, None, None]

    def gather(states: dict[int, torch.Tensor], ls: Seq[int]) -> torch.Tensor:
        return torch.stack([states[l][rows, pos] for l in ls], dim=1)

    return gather(out.resid, layers), (gather(out.attn, attn_layers) if attn_layers else None)


def question_and_block_states(
    backend: Backend, builder: SequenceBuilder, examples: Seq[Example], layers: Seq[int], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """States of the inference prompts of `examples` at `layers`, in memory: the blocks'
    [n, len(layers), K, M + 2, d] and the question's [n, len(layers), Q, d] (its positions from
    the first, `Role.QUESTION`, zero-padded to the longest question Q): what a conditional probe
    reads (`conditional`)."""
    blocks, questions = [], []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        batch = builder.collate([builder.prompt(ex) for ex in chunk], side="left")
        out = backend.forward(batch, capture=layers)
        rows = torch.arange(len(chunk))
        resid = torch.stack([out.resid[l] for l in layers], 1)  # [B, layers, S, d]
        blocks.append(resid[rows[:, None, None], :, block_positions(batch)].permute(0, 3, 1, 2, 4))
        is_question = batch.roles == Role.QUESTION
        order = torch.argsort((~is_question).int(), dim=1, stable=True)  # question positions first
        length = int(is_question.sum(1).max())
        where = order[:, :length]
        states = resid[rows[:, None], :, where].permute(0, 2, 1, 3)  # [B, layers, Q, d]
        questions.append(states * is_question.gather(1, where)[:, None, :, None])
    width = max(q.shape[2] for q in questions)
    questions = [torch.nn.functional.pad(q, (0, 0, 0, width - q.shape[2])) for q in questions]
    return torch.cat(blocks), torch.cat(questions)


def capture(
    backend: Backend,
    builder: SequenceBuilder,
    task: Task,
    examples: Seq[Example],
    out_dir: str | Path,
    *,
    layers: Seq[int] | None = None,
    attn: bool = False,
    readouts: bool = True,
    batch_size: int = 64,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    max_new_tokens: int = 32,
    record: dict | None = None,
) -> CaptureStore:
    """Capture block (or Coconut thought) states of `examples` (and, with `readouts`, the greedy
    readout after every block, decoded by the model itself) into `out_dir`; `record` says what the
    capture is of."""
    spec = builder.spec
    if not spec.latent_blocks:
        raise RunError(f"a {spec.method} model has no memory blocks to capture (nor continuous thoughts)")
    layers = list(range(backend.n_layers + 1)) if layers is None else sorted(set(layers))
    backend.check_layers(layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    shards, records = [], []
    for start in progress(range(0, len(examples), shard_size), desc="capture", unit="shard"):
        chunk = list(examples[start : start + shard_size])
        texts_per_block = _readouts(backend, builder, chunk, readouts, max_new_tokens)
        tensors = _shard_states(backend, builder, chunk, layers, attn, batch_size, dtype)
        tensors["index"] = torch.arange(start, start + len(chunk))
        shards.append(_save_shard(out, len(shards), tensors))
        for i, ex in enumerate(chunk):
            texts = [block[i] for block in texts_per_block]
            records.append(_example_record(task, ex, start + i, texts, readouts))
    atomic_write_text(out / "examples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    meta = {
        "n": len(records),
        "layers": layers,
        "attn_layers": [l for l in layers if l < backend.n_layers] if attn else [],
        "K": spec.latent_blocks,
        "M": spec.M,
        "slots": slot_names(spec),
        "d_model": backend.d_model,
        "n_layers": backend.n_layers,
        "backend": backend.name,
        "task": task.name,
        "method": spec.method,
        "dtype": str(dtype).replace("torch.", ""),
        "readouts": readouts,
        "shards": shards,
        "record": record or {},
    }
    atomic_write_json(out / "meta.json", meta)
    return CaptureStore(out)


def _readouts(
    backend: Backend, builder: SequenceBuilder, examples: list[Example], readouts: bool, max_new_tokens: int
) -> list[list[str]]:
    """The greedy readout after every block of every example, decoded by the model: [K][n] (empty
    texts without `readouts`)."""
    blocks = block_labels(builder.spec.latent_blocks)
    if not readouts:
        return [[""] * len(examples) for _ in blocks]
    texts = []
    for k in blocks:
        found = decode_answers(backend.model, builder.tokenizer, builder, examples, k, 256, max_new_tokens)
        texts.append([r.text for r in found])
    return texts


def _shard_states(
    backend: Backend,
    builder: SequenceBuilder,
    examples: list[Example],
    layers: list[int],
    attn: bool,
    batch_size: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """One shard's block states, `batch_size` examples per pass: `resid` and, with `attn`, `attn`."""
    resid, attn_states = [], []
    for b in range(0, len(examples), batch_size):
        r, a = block_states(backend, builder, examples[b : b + batch_size], layers, attn)
        resid.append(r.to(dtype))
        if a is not None:
            attn_states.append(a.to(dtype))
    return {"resid": torch.cat(resid), **({"attn": torch.cat(attn_states)} if attn_states else {})}


def _save_shard(out: Path, number: int, tensors: dict[str, torch.Tensor]) -> str:
    """Write shard `number` atomically (a temporary file, then renamed); returns its file name."""
    name = f"shard_{number:05d}.safetensors"
    save_file(tensors, out / f".{name}.tmp")
    os.replace(out / f".{name}.tmp", out / name)
    return name


def _example_record(task: Task, ex: Example, index: int, texts: list[str], readouts: bool) -> dict:
    """An example's line of `examples.jsonl`: what it is, and its readout after every block."""
    return {
        "index": index,
        "id": ex.id,
        "question": ex.question,
        "answer": ex.answer,
        "steps": list(ex.steps),
        "values": list(ex.values),
        "derived": {name: list(v) for name, v in task.derived_values(ex).items()},
        "readouts": texts,
        "correct": [readouts and task.answers_match(t, ex.answer) for t in texts],
    }


class CaptureStore:
    """Read access to a capture directory, sliced by layer, block (1-based) and slot."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise RunError(
                f"{self.path}: no complete capture here; produce one with "
                f"`rim-lens analyze {artefacts.CAPTURE} RUN`"
            )
        fix = "capture again with `rim-lens analyze capture RUN`"
        self.meta = read_json(meta_path, RunError, fix)
        if not (isinstance(self.meta, dict) and isinstance(self.meta.get("shards"), list)):
            raise RunError(f"{meta_path}: not a capture's metadata (no list of shards); {fix}")
        self.examples = read_jsonl(self.path / "examples.jsonl", RunError, fix)
        for name in self.meta["shards"]:
            check_safetensors(self.path / str(name), RunError, fix)

    @property
    def n(self) -> int:
        return self.meta["n"]

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    @property
    def K(self) -> int:
        return self.meta["K"]

    @property
    def slots(self) -> list[str]:
        return self.meta["slots"]

    @property
    def record(self) -> dict:
        """What the capture is of: model, examples and options (see `fingerprint`)."""
        return self.meta.get("record") or {}

    def correct(self, block: int | None = None) -> np.ndarray:
        """[n, K] whether the readout after each block was correct ([n] for one block)."""
        correct = np.array([r["correct"] for r in self.examples], dtype=bool).reshape(self.n, self.K)
        return correct if block is None else correct[:, block_index(block)]

    def _index(self, layer: int | None, block: int | None, slot: int | None, layers: list[int]) -> tuple:
        return state_index(layers, self.K, len(self.slots), layer, block, slot)

    def _read(self, key: str, index: tuple) -> Iterator[np.ndarray]:
        for name in self.meta["shards"]:
            with safe_open(self.path / name, framework="pt") as f:
                yield f.get_slice(key)[index].float().numpy()

    def resid(
        self, layer: int | None = None, block: int | None = None, slot: int | None = None
    ) -> np.ndarray:
        """Residual states [n, (layers), (K), (slots), d]; a given index drops its axis."""
        return np.concatenate(list(self._read("resid", self._index(layer, block, slot, self.layers))))

    def attn(self, layer: int | None = None, block: int | None = None, slot: int | None = None) -> np.ndarray:
        """Attention outputs, indexed like `resid` (only if captured with attn=True)."""
        if not self.meta["attn_layers"]:
            raise RunError(f"{self.path}: attention outputs were not captured (use --attn)")
        return np.concatenate(
            list(self._read("attn", self._index(layer, block, slot, self.meta["attn_layers"])))
        )


# -- representations ---------------------------------------------------------------------------------
@dataclass(repr=False)
class CaptureResult(Result):
    """A capture of block states on disk (`store`: read by layer, block, slot) and its examples."""

    store: object = None
    name: ClassVar[str] = artefacts.CAPTURE

    def figures(self) -> dict[str, go.Figure]:
        if not self.store.meta.get("readouts", True):
            return {}
        per_block = {
            f"block {k}": estimate_of(self.store.correct(block=k)) for k in block_labels(self.store.K)
        }
        return {"capture.readouts": figures.estimates(per_block, "Accuracy of the readout after each block")}

    def save(self, directory: str | Path) -> Path:
        """Copy the capture to `directory`/capture (nothing to do if it is there already)."""
        target = Path(directory) / artefacts.CAPTURE
        if target.resolve() != Path(self.store.path).resolve():
            shutil.copytree(self.store.path, target, dirs_exist_ok=True)
        return Path(directory)
