"""Logit lens and a cheap tuned lens at memory-block positions, on captured states.

`transformer_lens.tools.analysis.logit_lens` runs the model itself on token prompts and reads
its cache; here the block states are already captured (from prompts with their own position
ids and masks), so only its kernel fits: a TransformerBridge is read through
`logit_readout`, which passes any d_model vectors through the bridge's ln_final and
unembedding. A plain HF model is read through its own final norm and output embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from sklearn.linear_model import Ridge
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rim_lens.analysis import figures
from rim_lens.analysis.capture import CaptureStore
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, block_index, block_labels, checked
from rim_lens.errors import RunError

# Logits held at once (rows x vocabulary) when reading states through the unembedding.
_CHUNK = 2**24


def final_norm(model: PreTrainedModel) -> torch.nn.Module:
    """The norm between the last layer and the unembedding (GPT-2 `ln_f`, Llama `norm`)."""
    # It is the base model's last direct child that is a norm; the layers' own norms sit
    # inside the layer list.
    norms = [m for m in model.base_model.children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise RunError(
            f"{type(model).__name__}: no final norm found among {type(model.base_model).__name__}'s modules"
        )
    return norms[-1]


def unembedding(model: PreTrainedModel | object) -> Callable[[torch.Tensor], torch.Tensor]:
    """Residual vectors [..., d_model] -> logits [..., vocab] through the model's final norm and
    unembedding; `model` is an HF model or a TransformerBridge (then TL's `logit_readout`)."""
    if isinstance(model, PreTrainedModel):
        norm, head = final_norm(model), model.get_output_embeddings()

        @torch.no_grad()
        def read(x: torch.Tensor) -> torch.Tensor:
            return head(norm(x))

        return read
    from transformer_lens.tools.analysis.logit_lens import logit_readout

    return lambda x: logit_readout(model, x, chunk_size=1024).values


class TunedLens:
    """Per layer, an affine map from resid[l] to the final layer's resid[n_layers] at block
    positions, fitted by ridge regression and read through the model's unembedding.

    A cheap stand-in for the trained tuned lens (Belrose et al. 2023; its package does not
    install beside TransformerLens 4). Fit it on other examples than it is judged on.
    `alpha` is relative to the mean eigenvalue of the states' (centred) Gram matrix, so one
    value suits any residual-stream scale.
    """

    def __init__(self, alpha: float = 1e-3) -> None:
        self.alpha = alpha
        self.maps: dict[int, Ridge] = {}

    def fit(
        self, store: CaptureStore, examples: Seq[int] | None = None, layers: Seq[int] | None = None
    ) -> TunedLens:
        idx = _examples(store, examples)
        target = _final_states(store)[idx]
        for layer in store.layers if layers is None else layers:
            x = store.resid(layer=layer)[idx].reshape(-1, target.shape[-1])
            # States identical across rows (scale 0) still need a positive penalty to solve.
            scale = max(np.square(x - x.mean(0)).sum() / x.shape[-1], 1e-12)
            self.maps[layer] = Ridge(alpha=self.alpha * scale).fit(x, target.reshape(x.shape))
        return self

    def __call__(self, states: np.ndarray, layer: int) -> np.ndarray:
        """`states` [..., d] of `layer` translated to the final layer's space."""
        if layer not in self.maps:
            raise RunError(f"the tuned lens was not fitted at layer {layer} (fitted: {sorted(self.maps)})")
        flat = states.reshape(-1, states.shape[-1])
        return self.maps[layer].predict(flat).astype(np.float32).reshape(states.shape)


def _examples(store: CaptureStore, examples: Seq[int] | None) -> np.ndarray:
    idx = np.arange(store.n) if examples is None else np.asarray(examples, dtype=int)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= store.n:
        raise RunError(f"examples must be indices in 0..{store.n - 1}")
    return idx


def _final_states(store: CaptureStore) -> np.ndarray:
    final = store.meta["n_layers"]
    if final not in store.layers:
        raise RunError(f"{store.path}: the final layer {final} was not captured; a lens needs it")
    return store.resid(layer=final)


def _log_probs(
    read: Callable[[torch.Tensor], torch.Tensor], states: np.ndarray, vocab: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Log-probabilities of states [n, ..., d], a chunk of examples at a time."""
    per_example = int(np.prod(states.shape[1:-1])) * vocab
    step = max(1, _CHUNK // per_example)
    for start in range(0, len(states), step):
        rows = slice(start, start + step)
        yield rows, torch.log_softmax(read(torch.from_numpy(np.ascontiguousarray(states[rows]))).float(), -1)


def _lenses(tuned: TunedLens | None) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
    lenses = {"logit": lambda states, layer: states}
    if tuned is not None:
        lenses["tuned"] = tuned
    return lenses


def logit_lens(
    model: PreTrainedModel | object,
    tokenizer: PreTrainedTokenizerBase,
    store: CaptureStore,
    layers: Seq[int] | None = None,
    blocks: Seq[int] | None = None,
    slots: Seq[int] | None = None,
    examples: Seq[int] | None = None,
    top_k: int = 5,
    tuned: TunedLens | None = None,
) -> pd.DataFrame:
    """The tokens each (layer, block, slot) state reads as, through the final norm and
    unembedding, with probabilities averaged over `examples` (default all).

    Columns: layer, block, slot, lens ("logit"; also "tuned" when `tuned` is given), rank
    (1 = most probable), token_id, token, prob, n (examples averaged).
    """
    read = unembedding(model)
    idx = _examples(store, examples)
    blocks = checked(blocks, 1, store.K, "block")
    slots = checked(slots, 0, len(store.slots) - 1, "slot")
    vocab = read(torch.zeros(1, store.meta["d_model"])).shape[-1]
    rows = []
    for layer in store.layers if layers is None else layers:
        columns = [block_index(k) for k in blocks]
        states = store.resid(layer=layer)[idx][:, columns][:, :, slots]  # [n, blocks, slots, d]
        for name, lens in _lenses(tuned).items():
            translated = lens(states, layer)
            mean = sum(lp.exp().sum(0) for _, lp in _log_probs(read, translated, vocab)) / len(idx)
            probs, ids = mean.topk(min(top_k, vocab), dim=-1)
            for b, k in enumerate(blocks):
                for s, j in enumerate(slots):
                    rows += [
                        {
                            "layer": layer,
                            "block": k,
                            "slot": j,
                            "lens": name,
                            "rank": r + 1,
                            "token_id": int(t),
                            "token": tokenizer.decode([int(t)]),
                            "prob": float(p),
                            "n": len(idx),
                        }
                        for r, (t, p) in enumerate(zip(ids[b, s], probs[b, s]))
                    ]
    return pd.DataFrame(rows)


def lens_quality(
    model: PreTrainedModel | object,
    store: CaptureStore,
    tuned: TunedLens | None = None,
    layers: Seq[int] | None = None,
    examples: Seq[int] | None = None,
) -> pd.DataFrame:
    """How close each layer's lens distribution comes to the model's own (the final layer's)
    at the block positions.

    Columns: layer, block, lens ("logit"; also "tuned"), kl (KL(final || lens) in nats, mean
    over examples and slots), top1_agreement (the fraction of states whose most probable
    token is the model's), n (states). Judge a tuned lens on examples it was not fitted on.
    """
    read = unembedding(model)
    idx = _examples(store, examples)
    final = _final_states(store)[idx]
    vocab = read(torch.zeros(1, final.shape[-1])).shape[-1]
    rows = []
    for layer in store.layers if layers is None else layers:
        states = store.resid(layer=layer)[idx]
        for name, lens in _lenses(tuned).items():
            kl, agree = torch.zeros(store.K), torch.zeros(store.K)
            for part, lp in _log_probs(read, lens(states, layer), vocab):
                # Recomputed per chunk: all final distributions at once can take gigabytes.
                ref = next(_log_probs(read, final[part], vocab))[1]
                kl += (ref.exp() * (ref - lp)).sum(-1).sum((0, 2))
                agree += (ref.argmax(-1) == lp.argmax(-1)).float().sum((0, 2))
            count = len(idx) * len(store.slots)
            rows += [
                {
                    "layer": layer,
                    "block": k,
                    "lens": name,
                    "kl": float(kl[block_index(k)] / count),
                    "top1_agreement": float(agree[block_index(k)] / count),
                    "n": count,
                }
                for k in block_labels(store.K)
            ]
    return pd.DataFrame(rows)


@dataclass(repr=False)
class LensResult(Result):
    """Logit (and tuned) lens: top tokens per (layer, block, slot), and each lens' agreement
    with the model's own final-layer prediction (`quality`)."""

    quality: pd.DataFrame | None = None
    name: ClassVar[str] = "lens"

    def tables(self) -> dict[str, pd.DataFrame]:
        tables = {"lens": self.table}
        if self.quality is not None:
            tables["lens_quality"] = self.quality
        return tables

    def figures(self) -> dict[str, go.Figure]:
        return {"lens.top1": figures.lens_top_tokens(self.table)}


def analyse(lab: Session, sel: Selection, top_k: int = 5, tuned: bool = True) -> LensResult:
    """The tokens each block state of `sel` reads as through the final norm and unembedding (logit
    lens) and, with `tuned`, through a ridge map fitted on the first half of the examples (tuned
    lens); both judged on the second half."""
    store = lab.capture().store
    half = store.n // 2
    held_out = range(half, store.n) if tuned else range(store.n)
    lens_fit = TunedLens().fit(store, examples=range(half)) if tuned else None
    reader = lab.backend.lens_model
    table = logit_lens(
        reader, lab.tokenizer, store, layers=sel.layers, blocks=sel.blocks, slots=sel.slots,
        examples=held_out, top_k=top_k, tuned=lens_fit,
    )  # fmt: skip
    quality = lens_quality(reader, store, tuned=lens_fit, layers=sel.layers, examples=held_out)
    by_layer = quality.groupby(["lens", "layer"])["top1_agreement"].mean()
    summary = {
        "top1_agreement_with_final": {f"{name}/{layer}": float(v) for (name, layer), v in by_layer.items()},
        "tuned_lens_fit_on": half if tuned else 0,
        "evaluated_on": len(held_out),
    }
    return LensResult(table, summary, lab.record("lens", sel, top_k=top_k, tuned=tuned), quality)
