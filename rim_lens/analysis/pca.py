"""PCA of memory-block states and how much they depend on the input.

The paper's PCA showed block states nearly identical across inputs before training, and
block-specific and input-dependent after it. `block_pca` gives the picture (trajectories of
blocks 1..K in the top principal components), `input_dependence` the number behind it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.decomposition import PCA

from rim_lens.analysis import figures
from rim_lens.analysis.capture import CaptureStore
from rim_lens.analysis.results import Result
from rim_lens.analysis.sites import BlockStates, block_index, block_labels
from rim_lens.errors import RunError


@dataclass
class BlockPCA:
    """Results of `block_pca`.

    trajectory: layer, block, slot, pc1..pcN: the mean projection of each block's slot over
        all examples; in block order it is the path the memory takes through blocks 1..K.
    examples: layer, block, slot, example, pc1..pcN: the same for each chosen example.
    explained: layer, (slot when fitted per slot), component, explained_variance_ratio.
    fits: the fitted PCA of each layer (per slot: of each (layer, slot)), to project other states.
    """

    trajectory: pd.DataFrame
    examples: pd.DataFrame
    explained: pd.DataFrame
    fits: dict


def _selected(
    store: CaptureStore, layer: int, blocks: Seq[int] | None, slots: Seq[int] | None
) -> tuple[np.ndarray, list[int], list[int]]:
    """The states of one layer [n, blocks, slots, d] and the block and slot labels kept."""
    states = store.resid(layer=layer)  # [n, K, slots, d]
    blocks = list(block_labels(states.shape[1])) if blocks is None else list(blocks)
    slots = list(range(states.shape[2])) if slots is None else list(slots)
    return states[:, [block_index(k) for k in blocks]][:, :, slots], blocks, slots


def block_pca(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    n_components: int = 2,
    per_slot: bool = False,
    examples: Seq[int] = (),
    seed: int = 0,
    blocks: Seq[int] | None = None,
    slots: Seq[int] | None = None,
) -> BlockPCA:
    """Per layer, a PCA fitted on the states of all examples x blocks x slots (or one PCA per
    slot with `per_slot`), and every block's projection onto it; `blocks` and `slots` (default
    all) restrict the states used."""
    pcs = [f"pc{i}" for i in range(1, n_components + 1)]
    examples = list(examples)
    if any(not 0 <= e < store.n for e in examples):
        raise RunError(f"examples must be indices in 0..{store.n - 1}")
    trajectory, chosen, explained, fitted = [], [], [], {}
    for layer in store.layers if layers is None else layers:
        states, kept_blocks, kept_slots = _selected(store, layer, blocks, slots)
        n, B, S, d = states.shape
        fits = [(None, list(range(S)))] if not per_slot else [(s, [s]) for s in range(S)]
        for fit_slot, columns in fits:
            part = states[:, :, columns]
            pca = PCA(n_components, random_state=seed).fit(part.reshape(-1, d))
            label = None if fit_slot is None else kept_slots[fit_slot]
            fitted[layer if label is None else (layer, label)] = pca
            z = pca.transform(part.reshape(-1, d)).reshape(n, B, len(columns), n_components)
            scope = {"layer": layer, **({} if label is None else {"slot": label})}
            explained += [
                {**scope, "component": i + 1, "explained_variance_ratio": float(r)}
                for i, r in enumerate(pca.explained_variance_ratio_)
            ]
            for b, k in enumerate(kept_blocks):
                for c, column in enumerate(columns):
                    cell = {"layer": layer, "block": k, "slot": kept_slots[column]}
                    zk = z[:, b, c]
                    trajectory.append({**cell, **dict(zip(pcs, zk.mean(0).tolist()))})
                    chosen += [{**cell, "example": e, **dict(zip(pcs, zk[e].tolist()))} for e in examples]
    sort = ["layer", "slot", "block"]
    return BlockPCA(
        trajectory=pd.DataFrame(trajectory).sort_values(sort, ignore_index=True),
        examples=pd.DataFrame(chosen, columns=["layer", "block", "slot", "example", *pcs]).sort_values(
            ["example", *sort], ignore_index=True
        ),
        explained=pd.DataFrame(explained),
        fits=fitted,
    )


def input_dependence(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    slots: Seq[int] | None = None,
) -> pd.DataFrame:
    """Variance across inputs within each block relative to variance across blocks.

    Columns: layer, block, slot, input_var (total variance over examples of that block's slot),
    block_var (total variance over blocks of the per-block mean states of that slot), ratio
    (input_var / block_var). A ratio near 0 means the blocks hold the same state whatever the
    input; a large one, that the input dominates. block_var is 0, and the ratio inf or NaN,
    only when every block's mean state is the same (e.g. K = 1). `blocks` and `slots` (default
    all) restrict the states used.
    """
    rows = []
    for layer in store.layers if layers is None else layers:
        states, kept_blocks, kept_slots = _selected(store, layer, blocks, slots)
        states = states.astype(np.float64)
        input_var = states.var(axis=0).sum(-1)  # [blocks, slots]
        block_var = states.mean(0).var(axis=0).sum(-1)  # [slots]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = input_var / block_var
        rows += [
            {
                "layer": layer,
                "block": k,
                "slot": j,
                "input_var": float(input_var[b, c]),
                "block_var": float(block_var[c]),
                "ratio": float(ratio[b, c]),
            }
            for b, k in enumerate(kept_blocks)
            for c, j in enumerate(kept_slots)
        ]
    return pd.DataFrame(rows)


def analyse(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    slots: Seq[int] | None = None,
    per_slot: bool = False,
    n_examples: int = 5,
) -> PCAResult:
    """The PCA result of a capture (or in-memory states): trajectories of the first `n_examples`,
    explained variance, input dependence and the fitted PCAs."""
    fit = block_pca(
        store, layers, per_slot=per_slot, examples=range(min(n_examples, store.n)), blocks=blocks, slots=slots
    )
    dependence = input_dependence(store, layers, blocks=blocks, slots=slots)
    per_layer = dependence.groupby("layer")["ratio"].mean()
    summary = {"input_dependence_by_layer": {int(l): float(r) for l, r in per_layer.items()}, "n": store.n}
    return PCAResult(fit.trajectory, summary, {}, fit.examples, fit.explained, dependence, fit.fits)


@dataclass(repr=False)
class PCAResult(Result):
    """PCA of block states per layer: the mean trajectory through blocks 1..K (`table`), a few
    examples' trajectories, explained variance, input dependence, and the fitted PCAs
    (`fits`, by layer) to project other states with `project`."""

    examples: pd.DataFrame | None = None
    explained: pd.DataFrame | None = None
    dependence: pd.DataFrame | None = None
    fits: dict = field(default_factory=dict)
    name: ClassVar[str] = "pca"
    summary_stem: ClassVar[str] = "pca_input_dependence"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "pca": self.table,
            "pca_examples": self.examples,
            "pca_explained": self.explained,
            "pca_input_dependence": self.dependence,
        }

    def projection(self, states: BlockStates, example: int = 0) -> pd.DataFrame:
        """One example's states (e.g. `lab.states([ex])`) in each fitted layer's components:
        layer, block, slot, pc1, pc2, ..."""
        rows = []
        for layer in [l for l in states.layers if l in self.fits]:
            z = self.project(states.resid(layer=layer)[example], layer)  # [K, slots, components]
            rows += [
                {
                    "layer": layer,
                    "block": k,
                    "slot": j,
                    **{f"pc{i + 1}": float(v) for i, v in enumerate(z[b, j])},
                }
                for b, k in enumerate(block_labels(states.K))
                for j in range(z.shape[1])
            ]
        return pd.DataFrame(rows)

    def project(self, states: np.ndarray, layer: int) -> np.ndarray:
        """States [..., d_model] of `layer` in that layer's principal components [..., n_components]."""
        if layer not in self.fits:
            raise RunError(f"no PCA was fitted at layer {layer} (fitted: {sorted(self.fits)})")
        flat = np.asarray(states, dtype=np.float64).reshape(-1, states.shape[-1])
        return self.fits[layer].transform(flat).reshape(*states.shape[:-1], -1)

    def figures(self) -> dict[str, go.Figure]:
        return {
            "pca.trajectories": figures.pca_trajectories(self.table, self.examples),
            "pca_input_dependence.heatmap": figures.layer_block_heatmap(
                self.dependence, "ratio", "Input dependence: variance across inputs / across blocks"
            ),
        }
