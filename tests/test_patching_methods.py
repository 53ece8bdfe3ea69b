"""The patching methods: `exact` (skipping unchanged work) gives the full sweep's numbers; attribution
patching is the first-order estimate it claims to be (against finite differences), and agrees with
TransformerLens' own attribution patching (its edge and node scores) where the two overlap.

Models: untrained GPT-2 and Llama checkpoints with large random weights (tests/fixtures.py), the
readout seeing the question or not, and prompts of different lengths (left padding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rim_lens as rl
from rim_lens.analysis import attribution, patching
from rim_lens.analysis.attribution import AttributionResult
from rim_lens.analysis.engine import Variant, correct_and_logprob, resume_sweep, score, sweep
from rim_lens.analysis.interventions import Intervention
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.sites import Site, block_index
from rim_lens.errors import RunError
from rim_lens.model.layouts import block_positions

torch.set_num_threads(1)

ATOL = 1e-5
SETTINGS = ["gpt2-visible", "gpt2-blind", "llama-visible", "llama-blind"]


@pytest.fixture(scope="module")
def labs(tmp_path_factory) -> dict[str, Lab]:
    from fixtures import random_checkpoint

    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint

    out = {}
    for setting in SETTINGS:
        arch, sees = setting.split("-")
        path = random_checkpoint(
            tmp_path_factory.mktemp(setting),
            arch,
            seed=1,
            std=0.05,
            K=3,
            M=2,
            readout_sees_question=sees == "visible",
        )
        model, tok, spec = load_checkpoint(path)
        task = get_task("modchain", min_length=1, max_length=3)
        out[setting] = Lab.from_model(model, tok, spec, task.generate(10, seed=2), task=task, model_dir=path)
    return out


def pairs_of(lab: Lab) -> patching.Pairs:
    pairs = patching.make_pairs(lab, seed=0)
    assert len({len(lab.builder.prompt(ex)) for ex in pairs.clean}) > 1, "padded batches are tested"
    return pairs


# -- exact patching skips unchanged work, and changes nothing -------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("per_slot", [False, True])
def test_exact_patching_equals_the_full_sweep(labs, setting, per_slot):
    lab = labs[setting]
    pairs, sel = pairs_of(lab), lab.select()
    exact = patching.patch(lab, sel, per_slot=per_slot, pairs=pairs, method="exact", max_rows=8)
    full = patching.patch(lab, sel, per_slot=per_slot, pairs=pairs, method="full")
    assert exact.record["options"]["method"] == "exact" and full.record["options"]["method"] == "full"
    np.testing.assert_allclose(exact.corrupt, full.corrupt, rtol=0, atol=ATOL)
    np.testing.assert_allclose(exact.patched, full.patched, rtol=0, atol=ATOL)
    np.testing.assert_allclose(exact.table["logit_diff"], full.table["logit_diff"], rtol=0, atol=ATOL)
    # Recovery divides by the clean - corrupt gap, which scales the tolerance with it.
    gap = abs(full.summary["logit_diff_clean"] - full.summary["logit_diff_corrupt"])
    np.testing.assert_allclose(exact.table["recovery"], full.table["recovery"], rtol=0, atol=ATOL / gap)
    assert np.abs(full.patched - full.corrupt[None]).max() > 1e-3, "patching must move the metric"
    # The default on the hf backend is the exact method.
    assert patching.patch(lab, sel, pairs=pairs).record["options"]["method"] == "exact"


@pytest.mark.parametrize("setting", ["gpt2-blind", "llama-visible"])
def test_resume_sweep_equals_sweep_at_every_position(labs, setting):
    """Not only the last position: teacher-forced scores read every answer position, so the kept
    logits before a row's start and the resumed ones after it must both be right."""
    lab = labs[setting]
    sel = lab.select()
    mean = lab.fit(rl.Mean(), lab.examples, sel)
    specs = [[], sel.sites(), sel.sites(blocks=[3]), sel.sites(layers=[1]), [Site(1, 2, 0), Site(0, 3, 3)]]
    variants = [Variant(s, mean if s else None) for s in specs]
    seqs = [lab.builder.scored(ex) for ex in lab.examples]
    full = sweep(lab.backend, lab.builder, seqs, variants, correct_and_logprob)
    skipping = resume_sweep(lab.backend, lab.builder, seqs, variants, correct_and_logprob, max_rows=7)
    assert torch.equal(full[..., 0], skipping[..., 0])
    torch.testing.assert_close(skipping[..., 1], full[..., 1], rtol=0, atol=ATOL)
    assert (full[1, :, 1] != full[0, :, 1]).any()
    # score() takes the same variants; the skipping engine is a drop-in for it.
    correct, logprob = score(lab.backend, lab.builder, lab.examples, variants)
    torch.testing.assert_close(logprob, skipping[..., 1], rtol=0, atol=ATOL)


def test_sweep_passes_shrink_to_the_logits_budget(labs, monkeypatch):
    """A pass holds at most LOGITS_BUDGET logit values (a pretrained vocabulary's memory): with a
    budget of two rows the sweep runs more passes and gives the same numbers."""
    from rim_lens.analysis import engine

    lab = labs["llama-visible"]
    sel = lab.select()
    variants = [Variant([], None), Variant(sel.sites(blocks=[2]), lab.fit(rl.Mean(), lab.examples, sel))]
    seqs = [lab.builder.scored(ex) for ex in lab.examples]
    whole = sweep(lab.backend, lab.builder, seqs, variants, correct_and_logprob)
    per_row = max(map(len, seqs)) * lab.model.config.vocab_size
    assert engine.rows_per_pass(lab.backend, seqs, 256) == min(256, engine.LOGITS_BUDGET // per_row)
    monkeypatch.setattr(engine, "LOGITS_BUDGET", 2 * per_row + 1)
    assert engine.rows_per_pass(lab.backend, seqs, 256) == 2
    passes = []
    forward = lab.backend.forward
    monkeypatch.setattr(
        lab.backend,
        "forward",
        lambda batch, **kw: passes.append(len(batch.input_ids)) or forward(batch, **kw),
    )
    small = sweep(lab.backend, lab.builder, seqs, variants, correct_and_logprob)
    assert max(passes) == 2 and len(passes) == len(seqs)  # 2 variants x n examples, 2 rows a pass
    assert torch.equal(small[..., 0], whole[..., 0])
    torch.testing.assert_close(small[..., 1], whole[..., 1], rtol=0, atol=ATOL)


def test_patch_methods_refuse_in_one_line(labs):
    lab = labs["gpt2-visible"]
    tl = lab.with_backend("tl")
    with pytest.raises(
        RunError, match="patch method 'exact' .* backend hf only; with backend tl use method 'full'"
    ):
        tl.patch(method="exact")
    with pytest.raises(RunError, match="unknown patch method 'fast'"):
        lab.patch(method="fast")
    assert tl.patch(blocks=[1]).record["options"]["method"] == "full"  # the default where exact cannot run
    in_memory = Lab.from_model(lab.model, lab.tokenizer, lab.spec, lab.examples, task=lab.task)
    with pytest.raises(
        RunError, match="'attribution' runs on a TransformerBridge, which boots from the checkpoint"
    ):
        in_memory.patch(method="attribution")


# -- attribution patching ---------------------------------------------------------------------------
class Toward(Intervention):
    """The corrupt state moved `alpha` of the way to the clean one (the finite difference's step)."""

    kind = "toward-for-tests"

    def __init__(self, clean: rl.Patch, alpha: float) -> None:
        self.clean, self.alpha = clean, alpha

    def __call__(self, base, site, rows):
        return base + self.alpha * (self.clean(base, site, rows) - base)


@pytest.mark.parametrize("setting", SETTINGS)
def test_attribution_equals_finite_differences(labs, setting):
    """Per pair and cell, plain attribution (AtP, no QK fix) is the derivative of the logit
    difference along the straight line from the corrupt state to the clean one, at the corrupt end:
    a central difference gives it (float32: a step of 0.05 keeps rounding noise below the
    tolerance)."""
    lab = labs[setting]
    pairs, sel = pairs_of(lab), lab.select()
    estimate = attribution.attribution_patch(lab, sel, per_slot=True, pairs=pairs, qk_fix=False)
    clean = lab.fit(rl.Patch(from_=pairs.clean), pairs.corrupt, sel)
    cells = [Site(r.layer, r.block, r.slot) for r in estimate.table.itertuples()]
    h, metric, seqs = 0.05, patching.logit_diff(pairs), pairs.prompts(lab.builder)
    ends = [
        sweep(lab.backend, lab.builder, seqs, [Variant([c], Toward(clean, a)) for c in cells], metric)
        for a in (h, -h)
    ]
    derivative = ((ends[0] - ends[1]).double() / (2 * h)).numpy()
    scores = estimate.patched - estimate.corrupt[None]
    np.testing.assert_allclose(scores, derivative, rtol=2e-2, atol=3e-5)
    assert np.abs(scores).max() > 1e-3
    # The estimate's table is exact patching's: the same cells, columns and baselines.
    exact = patching.patch(lab, sel, per_slot=True, pairs=pairs)
    assert list(estimate.table.columns) == list(exact.table.columns)
    assert estimate.table[["layer", "block", "slot"]].equals(exact.table[["layer", "block", "slot"]])
    np.testing.assert_allclose(estimate.clean, exact.clean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(estimate.corrupt, exact.corrupt, rtol=0, atol=ATOL)
    rho = attribution.agreement(exact, estimate)
    assert -1 <= rho.lo <= rho.hi <= 1 and -1 <= rho.value <= 1


def tl_pair(lab: Lab, pairs: patching.Pairs, i: int):
    """Pair i alone (no padding) as TransformerLens takes it: the bridge with its mask, its tokens,
    its metric, and the corrupt batch."""
    clean_seq, corrupt_seq = pairs.prompts(lab.builder, "clean")[i], pairs.prompts(lab.builder)[i]
    batch = lab.builder.collate([corrupt_seq])
    ct, xt = int(pairs.clean_token[i]), int(pairs.corrupt_token[i])
    bridge = attribution.Masked(attribution.bridge_of(lab), batch)
    return (
        bridge,
        torch.tensor([clean_seq.ids]),
        torch.tensor([corrupt_seq.ids]),
        lambda x: x[0, -1, ct] - x[0, -1, xt],
        batch,
    )


@pytest.mark.parametrize("setting", ["gpt2-blind", "llama-visible"])
def test_cells_are_transformer_lens_edges_across_the_layer(labs, setting):
    """A cell (resid[l] at position p) scores the sum of TransformerLens' edge scores from writers
    before layer l (the embedding, heads and MLPs of layers < l) to readers from layer l on (heads'
    q/k/v inputs and MLPs of layers >= l, the logits) at p: our mapping of its graph to cells."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    lab = labs[setting]
    pairs, sel = pairs_of(lab).subset([0]), lab.select()
    ours = attribution.attribution_patch(lab, sel, per_slot=True, pairs=pairs, edges=False, qk_fix=False)
    bridge, clean, corrupt, metric, batch = tl_pair(lab, pairs, 0)
    edges = attribution_patch(
        bridge, clean, corrupt, metric, EdgeAttributionConfig(granularity="edge")
    ).edge_scores
    pos = block_positions(batch)[0]
    L = lab.backend.n_layers

    def written_before(node, l):  # a writer's output is part of resid[layer + 1]
        return node.kind == "embed" or node.layer < l

    def read_from(node, l):
        return node.kind == "logits" or node.layer >= l

    for r in ours.table.itertuples():
        p = int(pos[block_index(r.block), r.slot])
        expected = sum(
            s
            for (w, rd), s in edges.items()
            if w.position == p and rd.position == p and written_before(w, r.layer) and read_from(rd, r.layer)
        )
        got = ours.patched[ours.table.index.get_loc(r.Index), 0] - ours.corrupt[0]
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-5), (r.layer, r.block, r.slot, L)


@pytest.mark.parametrize("setting", ["gpt2-visible", "llama-blind"])
def test_block_edges_sum_to_transformer_lens_head_nodes(labs, setting):
    """What a reader group takes from every source, summed, is the attribution of its positions'
    head outputs: TransformerLens' `attn_head_out` node scores there, summed over heads. And its
    components table is those node scores at block positions."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    lab = labs[setting]
    pairs, sel = pairs_of(lab).subset([1]), lab.select()
    result = attribution.attribution_patch(
        lab, sel, per_slot=True, pairs=pairs, with_components=True, qk_fix=False
    )
    assert isinstance(result, AttributionResult)
    bridge, clean, corrupt, metric, batch = tl_pair(lab, pairs, 0)
    nodes = attribution_patch(bridge, clean, corrupt, metric).node_scores
    labels, group = attribution.position_groups(batch)
    edges = result.edges.groupby(["layer", "reader"])["score"].sum()
    for l in sel.layers:
        for g, label in enumerate(labels):
            positions = set((group[0] == g).nonzero().flatten().tolist())
            expected = sum(
                s
                for n, s in nodes.items()
                if n.kind == "attn_head_out" and n.layer == l and n.position in positions
            )
            assert edges[l, label] == pytest.approx(expected, rel=1e-3, abs=1e-5), (l, label)
    comp = result.components
    pos = block_positions(batch)[0]
    for r in comp.sample(20, random_state=0).itertuples():
        p = int(pos[block_index(r.block), r.slot])
        kind = {"embed": "embed", "mlp": "mlp_out"}.get(r.component, "attn_head_out")
        head = None if kind != "attn_head_out" else int(r.component.split()[1])
        layer = None if kind == "embed" else r.layer
        match = [
            s for n, s in nodes.items() if (n.kind, n.layer, n.head, n.position) == (kind, layer, head, p)
        ]
        assert match and r.score == pytest.approx(match[0], rel=1e-6, abs=1e-7)
    # The embedding is layer 0's input: its node score is the layer-0 cell's.
    embed = comp[comp["component"] == "embed"].set_index(["block", "slot"])["score"]
    cells = result.table[result.table["layer"] == 0].set_index(["block", "slot"])
    delta = cells["logit_diff"] - result.summary["logit_diff_corrupt"]
    np.testing.assert_allclose(embed.loc[delta.index].values, delta.values, rtol=1e-3, atol=1e-5)


def test_lab_patch_attribution_saves_beside_exact(labs, tmp_path):
    lab = labs["llama-blind"]
    exact = lab.patch(layers=[1], blocks=[2, 3])
    est = lab.patch(layers=[1], blocks=[2, 3], method="attribution")
    assert est.record["options"]["method"] == "attribution" and est.record["options"]["qk_fix"]
    assert list(est.table.columns) == list(exact.table.columns) and len(est.table) == len(exact.table) == 2
    edges = est.edges
    assert set(edges["layer"]) == {1}
    assert set(edges["reader"]) == {"question", "block 1", "block 2", "block 3", "answer"}
    assert set(est.summary["edges"]) == {"previous_block_share", "even_share"}
    exact.save(tmp_path)
    est.save(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert {
        "patch.parquet",
        "patch_attribution.parquet",
        "patch_edges.parquet",
        "patch_attribution.json",
    } <= written
    assert {"patch_attribution.heatmap.fig.json", "patch_edges.heatmap.fig.json"} <= written


@pytest.mark.parametrize("setting", ["gpt2-blind", "llama-visible"])
def test_qk_fix_computes_the_attention_with_clean_keys_and_values(labs, setting):
    """AtP*'s QK fix: the hooked queries and keys give the model's attention pattern, and the fix's
    term is the attention output with the clean keys and values at the cell's positions, recomputed
    here by brute force (masked softmax over all keys), dotted with the gradient at z."""
    lab = labs[setting]
    pairs, sel = pairs_of(lab), lab.select()
    fix = attribution.QKFix(lab)
    names = [n for l in sel.layers for n in attribution._attn(l) + fix.names(l)]
    batch, clean, corrupt, *_ = attribution.gradients(lab, pairs, names, split=True)
    act, grads = corrupt["activations"], corrupt["gradients"]
    pos = block_positions(batch)
    allowed = batch.attention_mask[:, 0] == 0  # [B, q, k]
    for l in sel.layers:
        (pattern, v, z), (q, k, *_) = attribution._attn(l), fix.names(l)
        scale = fix.attention[l].scaling
        scores = torch.einsum("bqhd,bkhd->bhqk", act[q], act[k]) * scale
        model_pattern = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        torch.testing.assert_close(model_pattern, act[pattern], rtol=0, atol=1e-5)
        at = pos[:, block_index(2), [0, 2]]  # block 2, slots 0 and 2
        keys, values = act[k].clone(), act[v].clone()
        for b in range(len(at)):
            keys[b, at[b]], values[b, at[b]] = clean[k][b, at[b]], clean[v][b, at[b]]
        scores = torch.einsum("bqhd,bkhd->bhqk", act[q], keys) * scale
        new = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        dz = torch.einsum("bhqk,bkhd->bqhd", new, values) - act[z]
        expected = (dz * grads[z]).sum((1, 2, 3))
        torch.testing.assert_close(
            fix.exact_kv(clean, corrupt, l, at[None])[0], expected, rtol=1e-4, atol=1e-6
        )
        if l > 0:
            assert expected.abs().max() > 1e-5
    # With clean = corrupt nothing changes: the fixed estimate of a pair with itself is 0.
    same = patching.Pairs(pairs.corrupt, pairs.corrupt, pairs.prefix, pairs.clean_token, pairs.corrupt_token)
    none = attribution.attribution_patch(lab, sel, per_slot=True, pairs=same, edges=False, qk_fix=True)
    np.testing.assert_allclose(none.patched - none.corrupt[None], 0, atol=1e-6)


@pytest.mark.parametrize("setting", ["gpt2-blind", "llama-visible"])
def test_attribution_in_batches_equals_one_batch(labs, setting):
    """The pairs go through `max_rows` at a time, which bounds memory and changes no number: cells
    (with the QK fix), per-pair logit differences and block-to-block edges equal one batch of all
    pairs (different padding per batch included)."""
    lab = labs[setting]
    pairs, sel = pairs_of(lab), lab.select()
    n = len(pairs.clean)
    assert n > 3
    whole = attribution.attribution_patch(lab, sel, per_slot=True, pairs=pairs, max_rows=n)
    for rows in (1, 3):
        part = attribution.attribution_patch(lab, sel, per_slot=True, pairs=pairs, max_rows=rows)
        np.testing.assert_allclose(part.patched, whole.patched, rtol=1e-4, atol=ATOL)
        np.testing.assert_allclose(part.clean, whole.clean, rtol=0, atol=ATOL)
        np.testing.assert_allclose(part.corrupt, whole.corrupt, rtol=0, atol=ATOL)
        assert part.table[["layer", "block", "slot"]].equals(whole.table[["layer", "block", "slot"]])
        assert part.edges[["layer", "reader", "source"]].equals(whole.edges[["layer", "reader", "source"]])
        np.testing.assert_allclose(part.edges["score"], whole.edges["score"], rtol=1e-4, atol=ATOL)
    assert np.abs(whole.patched - whole.corrupt[None]).max() > 1e-3
    assert whole.edges["score"].abs().max() > 1e-4
