"""PCA of memory-block states and how much they depend on the input.

The paper's PCA showed block states nearly identical across inputs before training, and
block-specific and input-dependent after it. `block_pca` gives the picture (trajectories of
blocks 1..K in the top principal components), `input_dependence` the number behind it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from rim_lens.analysis.capture import CaptureStore
from rim_lens.errors import RunError


@dataclass
class BlockPCA:
    """Results of `block_pca`.

    trajectory: layer, block, slot, pc1..pcN: the mean projection of each block's slot over
        all examples; in block order it is the path the memory takes through blocks 1..K.
    examples: layer, block, slot, example, pc1..pcN: the same for each chosen example.
    explained: layer, (slot when fitted per slot), component, explained_variance_ratio.
    """

    trajectory: pd.DataFrame
    examples: pd.DataFrame
    explained: pd.DataFrame


def block_pca(
    store: CaptureStore,
    layers: Seq[int] | None = None,
    n_components: int = 2,
    per_slot: bool = False,
    examples: Seq[int] = (),
    seed: int = 0,
) -> BlockPCA:
    """Per layer, a PCA fitted on the states of all examples x blocks x slots (or one PCA per
    slot with `per_slot`), and every block's projection onto it."""
    pcs = [f"pc{i}" for i in range(1, n_components + 1)]
    examples = list(examples)
    if any(not 0 <= e < store.n for e in examples):
        raise RunError(f"examples must be indices in 0..{store.n - 1}")
    trajectory, chosen, explained = [], [], []
    for layer in store.layers if layers is None else layers:
        states = store.resid(layer=layer)  # [n, K, slots, d]
        n, K, S, d = states.shape
        fits = [(None, list(range(S)))] if not per_slot else [(j, [j]) for j in range(S)]
        for fit_slot, slots in fits:
            part = states[:, :, slots]
            pca = PCA(n_components, random_state=seed).fit(part.reshape(-1, d))
            z = pca.transform(part.reshape(-1, d)).reshape(n, K, len(slots), n_components)
            scope = {"layer": layer, **({} if fit_slot is None else {"slot": fit_slot})}
            explained += [
                {**scope, "component": i + 1, "explained_variance_ratio": float(r)}
                for i, r in enumerate(pca.explained_variance_ratio_)
            ]
            for k in range(K):
                for jj, j in enumerate(slots):
                    cell = {"layer": layer, "block": k + 1, "slot": j}
                    trajectory.append({**cell, **dict(zip(pcs, z[:, k, jj].mean(0).tolist()))})
                    chosen += [
                        {**cell, "example": e, **dict(zip(pcs, z[e, k, jj].tolist()))} for e in examples
                    ]
    sort = ["layer", "slot", "block"]
    return BlockPCA(
        trajectory=pd.DataFrame(trajectory).sort_values(sort, ignore_index=True),
        examples=pd.DataFrame(chosen, columns=["layer", "block", "slot", "example", *pcs]).sort_values(
            ["example", *sort], ignore_index=True
        ),
        explained=pd.DataFrame(explained),
    )


def input_dependence(store: CaptureStore, layers: Seq[int] | None = None) -> pd.DataFrame:
    """Variance across inputs within each block relative to variance across blocks.

    Columns: layer, block, slot, input_var (total variance over examples of that block's slot),
    block_var (total variance over blocks of the per-block mean states of that slot), ratio
    (input_var / block_var). A ratio near 0 means the blocks hold the same state whatever the
    input; a large one, that the input dominates. block_var is 0, and the ratio inf or NaN,
    only when every block's mean state is the same (e.g. K = 1).
    """
    rows = []
    for layer in store.layers if layers is None else layers:
        states = store.resid(layer=layer).astype(np.float64)  # [n, K, slots, d]
        input_var = states.var(axis=0).sum(-1)  # [K, slots]
        block_var = states.mean(0).var(axis=0).sum(-1)  # [slots]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = input_var / block_var
        K, S = input_var.shape
        rows += [
            {
                "layer": layer,
                "block": k + 1,
                "slot": j,
                "input_var": float(input_var[k, j]),
                "block_var": float(block_var[j]),
                "ratio": float(ratio[k, j]),
            }
            for k in range(K)
            for j in range(S)
        ]
    return pd.DataFrame(rows)
