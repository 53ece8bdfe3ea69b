"""Resumable training state: what a run needs to continue bit for bit after it was killed.

`RUN/checkpoint/` holds
  model.safetensors      every weight of the model being trained
  optimizer.safetensors  the optimizer's tensors (none at a stage boundary: each stage starts a
                         fresh optimizer)
  state.json             the position (stage, step, epoch, batch), the optimizer's and the LR
                         schedule's settings, the RNG states of python, numpy and torch, what the
                         finished stages reported, and a fingerprint of the data
  train_log.jsonl        the training log up to this point
  sha256.json            the SHA-256 of each of the four files above: a damaged, edited or
                         swapped file is refused, state.json as much as the weights
Safetensors and JSON only, no pickle. The directory is written beside its place and renamed into
it, so a kill never leaves half a checkpoint. A state.json that matches its checksum is also
checked against its schema before anything is restored from it.

The data order is a pure function of (seed, stage, epoch) (`epoch_seed`): a resumed run reseeds
the data generator for the epoch it stopped in and skips the batches it had consumed, which
replays the same batches whatever the batch sampler is, as long as it draws from that generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rim_lens.data.examples import Example
from rim_lens.errors import RunError
from rim_lens.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_safetensors,
    follow_umask,
    read_json,
    read_text,
    recover_dir,
    replace_dir,
    temp_dir,
    writing,
)

FORMAT = 2  # 1: the checksums sat inside state.json and did not cover it
MODEL, OPTIMIZER, STATE, LOG = "model.safetensors", "optimizer.safetensors", "state.json", "train_log.jsonl"
SUMS = "sha256.json"
COVERED = (MODEL, OPTIMIZER, STATE, LOG)  # every file of a checkpoint but SUMS itself
RESTART = "pass --restart to start the run over"


@dataclass
class Position:
    """Where training stands. `stage` indexes the run's stages (equal to their number once
    training is done); `step` counts the optimizer steps done in it; `batch` counts the batches
    of `epoch` already consumed."""

    stage: int = 0
    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class TrainState:
    """Everything but the tensors: where training stands and what it has measured so far."""

    position: Position
    data: str  # fingerprint of the train/val/test examples (`fingerprint`)
    tokens: int = 0  # tokens seen in the current stage
    elapsed_s: float = 0.0  # training time of the current stage
    readout_accuracy: dict = field(default_factory=dict)  # the last held-out check of the stage
    stages: dict = field(default_factory=dict)  # what each finished stage reported
    optimizer: Any = None  # optimizer.state_dict() without tensors (they are in optimizer.safetensors)
    scheduler: Any = None
    rng: Any = None


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The seed of the data order of one epoch of one stage: a pure function of the three."""
    return int(np.random.SeedSequence([seed, stage, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def fingerprint(splits: Sequence[Sequence[Example]]) -> str:
    """A hash of the examples of every split, in order: a resumed run checks it trains on the same data."""
    h = hashlib.sha256()
    for examples in splits:
        for ex in examples:
            h.update(json.dumps(ex.to_dict(), sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# -- RNG states ----------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- JSON + safetensors encoding of state dicts ----------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON, its tensors moved to `tensors` (tuples, arrays and non-string keys tagged)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__array__" in obj:
            return np.array(obj["__array__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- saving and loading --------------------------------------------------------------------------
def save(
    directory: str | Path,
    model: torch.nn.Module,
    state: TrainState,
    log: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> Path:
    """Write a checkpoint of `model` (unwrapped), optimizer, LR schedule and RNG states atomically."""
    tensors: dict[str, torch.Tensor] = {}
    payload = asdict(state)
    payload["format"] = FORMAT
    payload["optimizer"] = _encode(optimizer.state_dict(), tensors) if optimizer is not None else None
    payload["scheduler"] = _encode(scheduler.state_dict(), tensors) if scheduler is not None else None
    payload["rng"] = _encode(rng_state(), tensors)
    tmp = temp_dir(directory)
    try:
        with writing(directory):
            save_model(model, str(tmp / MODEL))
            save_file(tensors, str(tmp / OPTIMIZER))
            log = Path(log)
            atomic_write_text(tmp / LOG, read_text(log) if log.exists() else "")
            atomic_write_text(tmp / STATE, json.dumps(payload) + "\n")
            atomic_write_json(tmp / SUMS, {name: _sha256(tmp / name) for name in COVERED})
            follow_umask(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(directory)


@dataclass
class Checkpoint:
    """A checkpoint read back: its state, and the means to put it into a new model, optimizer and
    schedule."""

    path: Path
    state: TrainState
    _tensors: dict[str, torch.Tensor]

    @classmethod
    def read(cls, directory: str | Path) -> Checkpoint:
        """The checkpoint in `directory`, every file checked against its checksum and the state
        against its schema; RunError naming the file otherwise."""
        directory = Path(directory)
        recover_dir(directory)
        for name in (MODEL, OPTIMIZER):
            check_safetensors(directory / name, RunError, RESTART)
        if not (directory / SUMS).exists() and (directory / STATE).exists():
            raise RunError(f"{directory}: a checkpoint of an older rim-lens (no {SUMS}); {RESTART}")
        sums = read_json(directory / SUMS, RunError, RESTART)
        if not (isinstance(sums, dict) and all(isinstance(sums.get(name), str) for name in COVERED)):
            raise RunError(f"{directory / SUMS}: not the checksums of {', '.join(COVERED)}; {RESTART}")
        for name in COVERED:
            if not (directory / name).is_file():
                raise RunError(f"{directory / name}: no such file; {RESTART}")
            if _sha256(directory / name) != sums[name]:
                raise RunError(f"{directory / name}: does not match its checksum ({SUMS}); {RESTART}")
        payload = read_json(directory / STATE, RunError, RESTART)
        problem = _schema_problem(payload)
        if problem:
            raise RunError(f"{directory / STATE}: {problem}; {RESTART}")
        try:
            tensors = load_file(str(directory / OPTIMIZER))
        except Exception as err:  # noqa: BLE001 - any damage to the file means the same to the user
            raise RunError(f"{directory / OPTIMIZER}: unreadable ({type(err).__name__}); {RESTART}") from None
        payload.pop("format")
        state = TrainState(position=Position(**payload.pop("position")), **payload)
        return cls(directory, state, tensors)

    def check_position(self, steps: Sequence[int]) -> None:
        """RunError unless the position lies within a run whose stages take `steps` steps."""
        p = self.state.position
        where = f"{self.path / STATE}: position stage {p.stage}, step {p.step}"
        if p.stage > len(steps) or (p.stage < len(steps) and p.step > steps[p.stage]):
            raise RunError(f"{where} lies outside this run's stages ({list(steps)} steps); {RESTART}")

    @staticmethod
    def position_of(directory: str | Path) -> str | None:
        """Where a checkpoint stands, for messages ("stage 0, step 0"), or None if unreadable."""
        try:
            p = read_json(Path(directory) / STATE)["position"]
            return f"stage {int(p['stage'])}, step {int(p['step'])}"
        except (RunError, KeyError, TypeError, ValueError):
            return None

    @property
    def log(self) -> str:
        return read_text(self.path / LOG, RunError, RESTART)

    def restore_model(self, model: torch.nn.Module) -> None:
        try:
            load_model(model, str(self.path / MODEL))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0][:120]
            raise RunError(
                f"{self.path / MODEL}: does not fit this run's model ({first}); {RESTART}"
            ) from None

    def restore_training(self, optimizer: Any, scheduler: Any) -> None:
        """Optimizer and schedule state, then the RNG states, as they were when the checkpoint was taken."""
        with self._restoring("optimizer and schedule"):
            optimizer.load_state_dict(_decode(self.state.optimizer, self._tensors))
            scheduler.load_state_dict(_decode(self.state.scheduler, self._tensors))
        self.restore_rng()

    def restore_rng(self) -> None:
        with self._restoring("random-number generator states"):
            set_rng_state(_decode(self.state.rng, self._tensors))

    @contextlib.contextmanager
    def _restoring(self, what: str):
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a state that passed its schema but does not fit
            raise RunError(
                f"{self.path / STATE}: its {what} do not fit this run ({type(err).__name__}); {RESTART}"
            ) from None


def _schema_problem(payload: Any) -> str | None:
    """What is wrong with a decoded state.json, or None: the format, a position of four counts,
    the data fingerprint, the counters, and the optimizer, schedule and RNG records."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return "not a checkpoint this version of rim-lens reads"
    expected = {f.name for f in fields(TrainState)} | {"format"}
    if set(payload) != expected:
        return f"expected the keys {', '.join(sorted(expected))}"
    position = payload["position"]
    counts = ("stage", "step", "epoch", "batch")
    if not (isinstance(position, dict) and set(position) == set(counts)) or not all(
        _count(position[k]) for k in counts
    ):
        return "position: expected stage, step, epoch and batch, each a whole number >= 0"
    if not isinstance(payload["data"], str) or not _count(payload["tokens"]):
        return "data and tokens: expected a fingerprint and a count"
    if not (isinstance(payload["elapsed_s"], int | float) and payload["elapsed_s"] >= 0):
        return "elapsed_s: expected seconds >= 0"
    for key in ("readout_accuracy", "stages"):
        if not isinstance(payload[key], dict):
            return f"{key}: expected a mapping"
    for key in ("optimizer", "scheduler"):
        if payload[key] is not None and not isinstance(payload[key], dict):
            return f"{key}: expected a mapping or null"
    rng = payload["rng"]
    if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng)):
        return "rng: expected the random-number generator states of python, numpy and torch"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
