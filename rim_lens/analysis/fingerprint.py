"""Fingerprints: what an analysis artefact came from, so a stale one is never reused.

Every saved analysis records the model it ran on (a hash of its weights and memory spec) and its
options (the examples' ids, the backend, the selection, the intervention, ...). An artefact is
reused only when its record's fingerprint equals the one the session would write now; anything
else (retrained weights, other examples, another layer) recomputes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

import rim_lens
from rim_lens.model.memory import MemorySpec


def digest(obj) -> str:
    """A short stable hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, spec: MemorySpec) -> str:
    """A hash of every parameter and buffer (name, dtype, shape, bytes) and the memory spec."""
    h = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def examples_fingerprint(ids: Sequence[str]) -> dict:
    return {"n": len(ids), "ids": digest(list(ids))}


def record(analysis: str, model: str, options: dict) -> dict:
    """What an artefact records: the analysis, the model's fingerprint, its options, the version,
    and `fingerprint`, the hash of all of them (what reuse compares)."""
    body = {"analysis": analysis, "model": model, "options": options, "rim_lens": rim_lens.__version__}
    return {**body, "fingerprint": digest(body)}


def matches(saved: dict | None, wanted: dict) -> bool:
    """Whether a saved record is exactly the wanted one."""
    return bool(saved) and saved.get("fingerprint") == wanted["fingerprint"]
