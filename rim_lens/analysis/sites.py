"""Where to look and where to intervene: sites labelled (layer, block, slot), and selections of them.

A site is a residual-stream state: `resid[layer]` (see `backends`) at slot `slot` of memory block
`block`. Blocks are labelled 1..K in every table, figure and argument, as in the paper (block t
holds step t); tensors index them from 0. `block_index` is the one place that offset lives.
Slots are 0..M+1: the begin token, the memory tokens, the end token. A Coconut model's
continuous thought k is block k with one slot, 0 (`MemorySpec.latent_blocks`; what an
intervention there means: `backends.HFBackend`). The sequence builder resolves a site's
(block, slot) to a token position (`layouts.block_positions`).

A `Selection` is data (pyvene's "where"): layers x blocks x slots, validated against a model,
serialisable with `to_dict`. What is done there is an `interventions.Intervention` ("how").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from rim_lens.errors import RunError


def block_index(block: int) -> int:
    """The tensor index of block `block` (blocks are labelled from 1, tensors count from 0)."""
    return block - 1


def block_labels(K: int) -> range:
    """The labels of K blocks: 1..K."""
    return range(1, K + 1)


class Site(NamedTuple):
    """One state: resid[layer] at slot `slot` of block `block` (1-based)."""

    layer: int
    block: int
    slot: int


def checked(values: Iterable[int] | None, low: int, high: int, what: str) -> list[int]:
    """`values` (None: all of low..high) sorted and unique; RunError naming the range if any is outside."""
    values = list(range(low, high + 1)) if values is None else sorted(set(values))
    bad = [v for v in values if not low <= v <= high]
    if bad or not values:
        raise RunError(f"{what} {bad or values} out of range: {what}s are {low}..{high}")
    return values


@dataclass(frozen=True)
class Selection:
    """The layers, blocks (1-based) and slots an analysis covers: every combination of them."""

    layers: tuple[int, ...]
    blocks: tuple[int, ...]
    slots: tuple[int, ...]

    @classmethod
    def of(
        cls,
        n_layers: int,
        K: int,
        n_slots: int,
        layers: Iterable[int] | None = None,
        blocks: Iterable[int] | None = None,
        slots: Iterable[int] | None = None,
        last_layer: int | None = None,
    ) -> Selection:
        """A validated selection of K blocks of `n_slots` slots (`MemorySpec.latent_blocks`,
        `.block_slots`); None means all. Layers go up to `last_layer` (default
        n_layers - 1: an intervention on resid[l] changes what layer l reads, so resid[n_layers],
        the output, can be read but not edited)."""
        top = n_layers - 1 if last_layer is None else last_layer
        return cls(
            tuple(checked(layers, 0, top, "layer")),
            tuple(checked(blocks, 1, K, "block")),
            tuple(checked(slots, 0, n_slots - 1, "slot")),
        )

    def sites(self, blocks: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> list[Site]:
        """Every site of the selection, or of some of its blocks / layers."""
        return [
            Site(l, k, j)
            for l in (layers or self.layers)
            for k in (blocks or self.blocks)
            for j in self.slots
        ]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        return cls(tuple(d["layers"]), tuple(d["blocks"]), tuple(d["slots"]))


class BlockStates:
    """Block states held in memory: [examples, layers, K, slots, d_model], read by labels.

    Shares its reading interface (`resid`, `layers`, `K`, `slots`, `n`) with the on-disk
    `capture.CaptureStore`, so PCA, probes and the lens take either.
    """

    path = "(block states in memory)"

    def __init__(
        self, states, layers: Sequence[int], slots: Sequence[str], ids: Sequence[str] = (), n_layers: int = 0
    ) -> None:
        self.states, self.layers, self.slots, self.ids = states, list(layers), list(slots), list(ids)
        self.n_layers = n_layers or max(self.layers)

    @property
    def meta(self) -> dict:
        """What a capture's meta.json says about its states."""
        return {
            "n": self.n,
            "layers": self.layers,
            "K": self.K,
            "slots": self.slots,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
        }

    @property
    def n(self) -> int:
        return self.states.shape[0]

    @property
    def K(self) -> int:
        return self.states.shape[2]

    @property
    def d_model(self) -> int:
        return self.states.shape[-1]

    def at(self, layer: int, block: int, slot: int):
        """The states of every example at one site: [n, d_model]."""
        return self.states[:, self.layers.index(layer), block_index(block), slot]

    def resid(
        self, layer: int | None = None, block: int | None = None, slot: int | None = None
    ) -> np.ndarray:
        """[n, (layers), (K), (slots), d] as numpy; a given index drops its axis."""
        index = state_index(self.layers, self.K, len(self.slots), layer, block, slot)
        states = self.states[index]
        return states.float().numpy() if hasattr(states, "numpy") else np.asarray(states)

    def norms(self) -> pd.DataFrame:
        """The L2 norm of every state, averaged over examples: layer, block, slot, norm."""
        norms = np.linalg.norm(self.resid(), axis=-1).mean(0)  # [layers, K, slots]
        return pd.DataFrame(
            [
                {"layer": l, "block": k, "slot": j, "norm": float(norms[i, block_index(k), j])}
                for i, l in enumerate(self.layers)
                for k in block_labels(self.K)
                for j in range(norms.shape[-1])
            ]
        )

    def subset(self, rows: Sequence[int]) -> BlockStates:
        ids = [self.ids[i] for i in rows] if self.ids else []
        return BlockStates(self.states[list(rows)], self.layers, self.slots, ids, self.n_layers)


def state_index(
    layers: list[int], K: int, n_slots: int, layer: int | None, block: int | None, slot: int | None
) -> tuple:
    """The index into [n, layers, K, slots, ...] of a (layer, block, slot) choice (None: all),
    with RunErrors naming the valid range."""
    if layer is not None and layer not in layers:
        raise RunError(f"layer {layer} out of range: captured layers are {layers}")
    if block is not None and not 1 <= block <= K:
        raise RunError(f"block {block} out of range: blocks are 1..{K}")
    if slot is not None and not 0 <= slot < n_slots:
        raise RunError(f"slot {slot} out of range: slots are 0..{n_slots - 1}")

    def pick(value, index):
        return slice(None) if value is None else index(value)

    return (slice(None), pick(layer, layers.index), pick(block, block_index), pick(slot, int))
