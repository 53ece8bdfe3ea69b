"""PCA input-dependence on synthetic states; logit and tuned lens on a tiny GPT-2's capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rim_lens.analysis.backends import make_backend
from rim_lens.analysis.capture import capture
from rim_lens.analysis.lens import TunedLens, lens_quality, logit_lens, unembedding
from rim_lens.analysis.pca import block_pca, input_dependence
from rim_lens.data.tasks import get_task
from rim_lens.errors import RunError
from rim_lens.model.checkpoints import build_model
from rim_lens.model.layouts import SequenceBuilder, block_positions
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer


class ArrayStore:
    """The part of CaptureStore that the PCA reads: states [n, layers, K, slots, d]."""

    def __init__(self, states: np.ndarray) -> None:
        self.states, self.n, self.layers = states, states.shape[0], list(range(states.shape[1]))

    def resid(self, layer: int) -> np.ndarray:
        return self.states[:, layer]


def synthetic(input_scale: float, n: int = 50, K: int = 4, S: int = 3, d: int = 8) -> ArrayStore:
    """Per (block, slot) a fixed state, plus input-dependent spread of `input_scale` (layer 1 only)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(K, S, d))
    states = np.broadcast_to(base, (n, 2, K, S, d)).copy()
    states[:, 1] += input_scale * rng.normal(size=(n, K, S, d))
    return ArrayStore(states.astype(np.float32))


def test_input_dependence_ratio():
    fixed = input_dependence(synthetic(0.0))
    assert len(fixed) == 2 * 4 * 3 and list(fixed.columns) == [
        "layer",
        "block",
        "slot",
        "input_var",
        "block_var",
        "ratio",
    ]
    assert (fixed["ratio"] < 1e-10).all()
    spread = input_dependence(synthetic(5.0))
    assert (spread.loc[spread["layer"] == 0, "ratio"] < 1e-10).all()  # layer 0 stays input-free
    assert (spread.loc[spread["layer"] == 1, "ratio"] > 10).all()


def test_block_pca_trajectories():
    out = block_pca(synthetic(0.0), n_components=2, examples=[0, 3])
    assert list(out.trajectory.columns) == ["layer", "block", "slot", "pc1", "pc2"]
    assert len(out.trajectory) == 2 * 4 * 3 and len(out.examples) == 2 * len(out.trajectory)
    # Identical inputs: every example sits exactly on the mean trajectory.
    ex0 = out.examples[out.examples["example"] == 0].drop(columns="example").reset_index(drop=True)
    np.testing.assert_allclose(ex0[["pc1", "pc2"]], out.trajectory[["pc1", "pc2"]], atol=1e-4)
    assert list(out.explained.columns) == ["layer", "component", "explained_variance_ratio"]
    per_slot = block_pca(synthetic(1.0), per_slot=True)
    assert set(per_slot.explained["slot"]) == {0, 1, 2}
    assert (per_slot.explained.groupby(["layer", "slot"])["explained_variance_ratio"].sum() <= 1 + 1e-6).all()
    with pytest.raises(RunError, match="examples"):
        block_pca(synthetic(0.0), examples=[50])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GPT-2 with memory tokens, and a capture of 24 modchain examples."""
    torch.manual_seed(0)
    task = get_task("modchain", length=2)
    examples = task.generate(24, seed=0)
    spec = MemorySpec(K=2, task="modchain")
    tok = build_word_tokenizer(
        [ex.question for ex in examples] + [" ".join(ex.steps) for ex in examples], spec
    )
    model = build_model(tok, "gpt2", "tiny").eval()
    backend = make_backend("hf", model, tok)
    builder = SequenceBuilder(tok, spec, task.join_steps)
    store = capture(backend, builder, task, examples, tmp_path_factory.mktemp("cap"), max_new_tokens=2)
    batch = builder.collate([builder.prompt(ex) for ex in examples], side="left")
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    own = logits[torch.arange(len(examples))[:, None, None], block_positions(batch)]  # [n, K, slots, vocab]
    return model, tok, store, own


def test_logit_lens_at_last_layer_is_the_models_own_logits(tiny):
    model, tok, store, own = tiny
    final = store.meta["n_layers"]
    read = unembedding(model)
    lens_logits = read(torch.from_numpy(store.resid(layer=final)))
    torch.testing.assert_close(lens_logits, own, atol=1e-5, rtol=1e-5)
    df = logit_lens(model, tok, store, layers=[final], examples=[5], top_k=3)
    assert list(df.columns) == ["layer", "block", "slot", "lens", "rank", "token_id", "token", "prob", "n"]
    assert len(df) == store.K * len(store.slots) * 3
    top = df[df["rank"] == 1].sort_values(["block", "slot"])
    assert top["token_id"].tolist() == own[5].argmax(-1).flatten().tolist()
    torch.testing.assert_close(
        torch.tensor(top["prob"].tolist()), own[5].softmax(-1).max(-1).values.flatten()
    )
    with pytest.raises(RunError, match="block"):
        logit_lens(model, tok, store, blocks=[3])


def test_tuned_lens_at_final_layer_is_identity(tiny):
    model, tok, store, _ = tiny
    final = store.meta["n_layers"]
    tuned = TunedLens().fit(store, examples=range(12))
    states = store.resid(layer=final)[12:]  # held out
    # Ridge shrinks the weakest directions of these nearly low-rank states a little.
    spread = states - states.reshape(-1, states.shape[-1]).mean(0)
    assert np.linalg.norm(tuned(states, final) - states) < 0.05 * np.linalg.norm(spread)
    q = lens_quality(model, store, tuned, examples=range(12, 24))
    assert list(q.columns) == ["layer", "block", "lens", "kl", "top1_agreement", "n"]
    last = q[q["layer"] == final]
    assert (last["kl"] < 1e-4).all() and (last["top1_agreement"] == 1).all()
    assert set(q["lens"]) == {"logit", "tuned"} and len(q) == len(store.layers) * store.K * 2
    df = logit_lens(model, tok, store, layers=[0], tuned=tuned, top_k=2)
    assert set(df["lens"]) == {"logit", "tuned"}


def test_bridge_unembedding_matches_hf(tiny, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    model, tok, store, _ = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(
        str(tmp_path), hf_model=model, tokenizer=AutoTokenizer.from_pretrained(tmp_path), device="cpu"
    )
    bridge.eval()
    states = torch.from_numpy(store.resid(layer=1)[:4])
    torch.testing.assert_close(unembedding(bridge)(states), unembedding(model)(states), atol=1e-5, rtol=1e-5)


def test_input_share_of_block_states():
    """0 when every question gives each block the same state, 1 when the blocks' mean states
    coincide, and the variance ratio in between; measured after each training stage."""
    from rim_lens.model.spread import input_share

    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(1, 1, 4, 2, 8))  # [layers, n, K, slots, d]: one state per block slot
    same_for_all = np.repeat(blocks, 10, axis=1)
    assert input_share(same_for_all)[0] == pytest.approx(0.0, abs=1e-12)
    only_input = np.repeat(rng.normal(size=(1, 10, 1, 2, 8)), 4, axis=2)
    assert input_share(only_input)[0] == pytest.approx(1.0)
    noise = rng.normal(scale=0.5, size=(1, 10, 4, 2, 8))
    both = same_for_all + noise
    per_slot = []
    for slot in range(2):
        states = both[0, :, :, slot]  # [n, K, d]
        within = np.mean([states[:, k].var(axis=0).sum() for k in range(4)])
        between = states.mean(0).var(axis=0).sum()
        per_slot.append(within / (within + between))
    assert input_share(both)[0] == pytest.approx(np.mean(per_slot))
    assert 0 < input_share(both)[0] < 1
