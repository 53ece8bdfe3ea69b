"""Interventions on memory blocks: padding invariance, patching against TransformerLens,
teacher-forced scoring against greedy decoding, and what ablation, knockout and interchange
show on a model that routes its answer through its blocks and on one that ignores them.

Models come from tests/fixtures.py (trained once per session, read-only here):
`tiny_runs` (copy task: rim routes the answer through its blocks, pause ignores them) and
`tiny_modchain_runs` (variable-length modchain: padding, and the synthetic task patching needs).
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from rim_lens.analysis import interventions as iv
from rim_lens.analysis.backends import Edit, make_backend
from rim_lens.analysis.lab import Lab
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import Role, block_positions, collate

torch.set_num_threads(1)

ATOL = 1e-5


@pytest.fixture(scope="module")
def routing(tiny_runs) -> Lab:
    """Copy-task RiM whose readout cannot see the question: the answer must pass through the blocks."""
    lab = Lab.open(tiny_runs["rim"], n=50)
    assert not lab.spec.readout_sees_question
    return lab


@pytest.fixture(scope="module")
def ignoring(tiny_runs) -> Lab:
    """Copy-task pause model: the readout sees the question, which holds the answer."""
    lab = Lab.open(tiny_runs["pause"], n=50)
    assert lab.spec.readout_sees_question
    return lab


@pytest.fixture(scope="module")
def chains(tiny_modchain_runs) -> dict[str, Lab]:
    """Variable-length modchain labs: rim (readout blind to the question) and pause."""
    return {name: Lab.open(tiny_modchain_runs[name], n=64) for name in ("rim", "pause")}


def mixed_lengths(lab: Lab, n: int = 10) -> list:
    """n examples whose questions (hence prompts) differ in length, so batches are padded."""
    examples = lab.examples[:n]
    assert len({len(lab.builder.prompt(ex)) for ex in examples}) > 1
    return examples


def shifted(values: iv.Values, offset: int) -> iv.Values:
    """`values` for a one-example run of example `offset` (run_variants numbers it 0)."""
    return lambda ex, l, k, j: values(ex + offset, l, k, j)


# -- padding invariance ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rim", "pause"])
@pytest.mark.parametrize("mode", iv.ABLATIONS)
def test_ablation_per_example_does_not_depend_on_padding(chains, name, mode):
    lab = chains[name]
    be, builder, examples = lab.backend, lab.builder, mixed_lengths(lab)
    sel = lab.select()
    states = iv.clean_states(be, builder, examples)
    singles = torch.cat([iv.clean_states(be, builder, [ex]) for ex in examples])
    torch.testing.assert_close(states, singles, rtol=0, atol=ATOL)
    values = iv.ablation_values(states, mode, seed=1)
    specs = [[], sel.sites(), sel.sites(blocks=[1]), sel.sites(layers=[lab.backend.n_layers - 1])]
    seqs = iv.scored_sequences(builder, examples)
    pad, sq = lab.tokenizer.pad_token_id, lab.spec.readout_sees_question

    def metric(logits, batch, ex_idx):
        correct, logprob = iv.answer_scores(logits, batch)
        return torch.stack([correct.float(), logprob], -1)

    # Left padding (run_variants), several examples and variants per pass.
    batched = iv.run_variants(be, seqs, [iv.Variant(s, values) for s in specs], metric, pad, sq)
    alone = torch.stack(
        [
            iv.run_variants(
                be, [seqs[i]], [iv.Variant(s, shifted(values, i)) for s in specs], metric, pad, sq
            )[:, 0]
            for i in range(len(examples))
        ],
        1,
    )
    assert (batched[..., 0] == alone[..., 0]).all()
    torch.testing.assert_close(batched[..., 1], alone[..., 1], rtol=0, atol=ATOL)
    assert (batched[0, :, 1] != batched[1, :, 1]).any(), "ablating every block must change something"

    # ablate() reports the means over examples of these per-example values.
    table = iv.ablate(be, builder, examples, sel, mode=mode, seed=1, states=states)
    for scope, v in (("intact", 0), ("all", 1)):
        row = table[table["scope"] == scope].iloc[0]
        assert row["accuracy"] == pytest.approx(alone[v, :, 0].mean().item())
        assert row["logprob"] == pytest.approx(alone[v, :, 1].mean().item(), abs=ATOL)

    # Right padding, the same edits by hand.
    batch = collate(seqs, pad, sq, side="right")
    assert (batch.roles[:, -1] == Role.PAD).any()
    pos, rows = block_positions(batch), torch.arange(len(examples))
    for v, sites in enumerate(specs):
        edits = [Edit(l, rows, pos[:, k - 1, j], values(rows, l, k, j)) for l, k, j in sites]
        correct, logprob = iv.answer_scores(be.run(batch, edits=edits).logits, batch)
        assert (correct.float() == alone[v, :, 0]).all()
        torch.testing.assert_close(logprob, alone[v, :, 1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["rim", "pause"])
def test_patching_per_example_does_not_depend_on_padding(chains, name):
    lab = chains[name]
    be, builder = lab.backend, lab.builder
    pairs = iv.make_pairs(lab.task, builder, mixed_lengths(lab, 12), seed=0)
    assert len({len(builder.prompt(ex)) for ex in pairs.clean}) > 1
    states = iv.clean_states(be, builder, pairs.clean)
    values = lambda ex, l, k, j: states[ex, l, k - 1, j]  # noqa: E731
    sel = lab.select()
    variants = [iv.Variant([])] + [
        iv.Variant(sel.sites(blocks=[k], layers=[l]), values) for l in sel.layers for k in sel.blocks
    ]
    seqs = [iv._with_prefix(builder, ex, p) for ex, p in zip(pairs.corrupt, pairs.prefix)]
    metric, pad, sq = iv.logit_diff_metric(pairs), lab.tokenizer.pad_token_id, lab.spec.readout_sees_question
    batched = iv.run_variants(be, seqs, variants, metric, pad, sq)
    alone = torch.stack(
        [
            iv.run_variants(
                be,
                [seqs[i]],
                [iv.Variant(v.sites, v.values and shifted(v.values, i)) for v in variants],
                lambda logits, batch, ex_idx, i=i: metric(logits, batch, ex_idx + i),
                pad,
                sq,
            )[:, 0]
            for i in range(len(seqs))
        ],
        1,
    )
    torch.testing.assert_close(batched, alone, rtol=0, atol=ATOL)
    # Right padding by hand: each row's metric at its own last token.
    batch = collate(seqs, pad, sq, side="right")
    assert (batch.roles[:, -1] == Role.PAD).any()
    pos, rows = block_positions(batch), torch.arange(len(seqs))
    last = (batch.roles != Role.PAD).sum(1) - 1
    for v, variant in enumerate(variants):
        edits = [Edit(l, rows, pos[:, k - 1, j], variant.values(rows, l, k, j)) for l, k, j in variant.sites]
        logits = be.run(batch, edits=edits).logits[rows, last]
        ld = logits[rows, pairs.clean_token] - logits[rows, pairs.corrupt_token]
        torch.testing.assert_close(ld, alone[v], rtol=0, atol=ATOL)
    # The patching table is the mean over pairs of these per-example values.
    table, base = iv.patch(be, builder, pairs, sel)
    torch.testing.assert_close(
        torch.tensor(table["logit_diff"].values, dtype=torch.float32), alone[1:].mean(1), rtol=0, atol=ATOL
    )
    assert base["logit_diff_corrupt"] == pytest.approx(alone[0].mean().item(), abs=ATOL)


# -- patching against TransformerLens --------------------------------------------------------------
@pytest.fixture(scope="module")
def random_labs(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Untrained GPT-2 and Llama checkpoints with large random weights (every position matters),
    readout seeing the question."""
    from fixtures import random_checkpoint

    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint
    from rim_lens.model.layouts import SequenceBuilder

    labs = {}
    for arch in ("gpt2", "llama"):
        path = random_checkpoint(tmp_path_factory.mktemp("random") / arch, arch, seed=1)
        model, tok, spec = load_checkpoint(path)
        task = get_task("modchain", min_length=2, max_length=2)
        be = make_backend("hf", model, tok, path)
        labs[arch] = SimpleNamespace(
            model=model,
            tokenizer=tok,
            spec=spec,
            task=task,
            backend=be,
            builder=SequenceBuilder(tok, spec, task.join_steps),
            model_dir=path,
            examples=task.generate(4, seed=2),
            select=lambda be=be, spec=spec: iv.select(be, spec.K, spec.M),
        )
    return labs


@pytest.mark.parametrize("run", ["copy-pause", "random-gpt2", "random-llama"])
def test_patch_per_slot_equals_transformer_lens_resid_pre_patching(run, random_labs, ignoring):
    """At the block positions, the batched sweep equals TransformerLens' own one-pass-per-cell
    `get_act_patch_resid_pre` on the same clean/corrupt pair (batch 1, no padding; the readout
    sees the question, so the default positions and causal mask are exactly the model's layout)."""
    from transformer_lens.patching import get_act_patch_resid_pre

    lab = ignoring if run == "copy-pause" else random_labs[run.split("-")[1]]
    builder = lab.builder
    if run == "copy-pause":
        # GSM8K cannot corrupt its questions: change the copied digit by hand.
        clean = lab.examples[0]
        digit = str((int(clean.answer) + 3) % 10)
        corrupt = lab.task.parse_line(
            f"{clean.question[:7]}{digit}{clean.question[8:]}||<<{digit}={digit}>> #### {digit}"
        )
        a, b = builder.encode(clean.answer), builder.encode(corrupt.answer)
        pairs = iv.Pairs([clean], [corrupt], [[]], torch.tensor(a[:1]), torch.tensor(b[:1]))
    else:
        pairs = iv.make_pairs(lab.task, builder, lab.examples[:1], seed=0)
    assert len(pairs.clean) == 1 and lab.spec.readout_sees_question
    sel = lab.select()
    table, base = iv.patch(lab.backend, builder, pairs, sel, per_slot=True)

    clean_seq = iv._with_prefix(builder, pairs.clean[0], pairs.prefix[0])
    corrupt_seq = iv._with_prefix(builder, pairs.corrupt[0], pairs.prefix[0])
    for seq in (clean_seq, corrupt_seq):
        assert seq.positions == list(range(len(seq))), "plain causal positions"
    clean_tokens, corrupt_tokens = torch.tensor([clean_seq.ids]), torch.tensor([corrupt_seq.ids])
    model_dir = lab.run.model_dir if run == "copy-pause" else lab.model_dir
    bridge = make_backend("tl", lab.model, lab.tokenizer, model_dir).bridge
    ct, xt = int(pairs.clean_token[0]), int(pairs.corrupt_token[0])

    def metric(logits):
        return logits[0, -1, ct] - logits[0, -1, xt]

    with torch.no_grad():
        clean_logits, clean_cache = bridge.run_with_cache(clean_tokens)
        grid = get_act_patch_resid_pre(bridge, corrupt_tokens, clean_cache, metric)  # [layer, pos]
        corrupt_ld = metric(bridge(corrupt_tokens)).item()
    assert grid.shape == (lab.backend.n_layers, len(corrupt_seq))
    assert base["logit_diff_clean"] == pytest.approx(metric(clean_logits).item(), abs=ATOL)
    assert base["logit_diff_corrupt"] == pytest.approx(corrupt_ld, abs=ATOL)

    pos = block_positions(collate([corrupt_seq], lab.tokenizer.pad_token_id, True))[0]  # [K, M + 2]
    expected = torch.tensor([grid[r.layer, pos[r.block - 1, r.slot]].item() for r in table.itertuples()])
    got = torch.tensor(table["logit_diff"].values, dtype=torch.float32)
    assert len(table) == len(sel.layers) * len(sel.blocks) * len(sel.slots)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    moved = (expected - corrupt_ld).abs()
    if run == "copy-pause":
        # This model ignores its blocks (see below): patching them barely moves the metric,
        # while patching the question's copied digit (position 3) at layer 0 flips the answer.
        assert moved.max() < 0.05
        assert grid[0, 3] - corrupt_ld > 1 and grid[0, 3] > 0
    else:
        # Layer 0 holds the block tokens' embeddings, the same in both runs; above it the
        # block states differ and patching them moves the metric.
        layer0 = torch.tensor((table["layer"] == 0).values)
        assert moved[layer0].max() < 1e-6 and moved[~layer0].max() > 1e-3


# -- teacher-forced scoring equals greedy decoding ------------------------------------------------------
@pytest.mark.parametrize("run", ["rim", "pause", "direct", "chain-rim"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_scores_agree_with_greedy_decoding(tiny_runs, tiny_modchain_runs, run, side):
    from rim_lens.data import read_examples
    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint
    from rim_lens.model.layouts import SequenceBuilder

    run_dir = tiny_modchain_runs["rim"] if run == "chain-rim" else tiny_runs[run]
    model, tok, spec = load_checkpoint(run_dir / "model")
    task = get_task(spec.task)
    examples = read_examples(run_dir / "data" / "eval.jsonl", task.name)[0][:48]
    builder = SequenceBuilder(tok, spec, task.join_steps)
    sq = spec.readout_sees_question
    batch = collate([builder.scored(ex) for ex in examples], tok.pad_token_id, sq, side=side)
    with torch.no_grad():
        correct, logprob = iv.answer_scores(model(**batch.model_inputs()).logits, batch)
    decoded = greedy_decode(
        model,
        [builder.prompt(ex) for ex in examples],
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=12,
        sees_question=sq,
    )
    greedy = [ids == builder.encode(ex.answer) for ids, ex in zip(decoded.tokens, examples)]
    assert correct.tolist() == greedy
    assert (logprob <= 0).all()
    if run == "chain-rim":  # the copy-task rim can be right on all 48, which would test less
        assert 0 < sum(greedy) < len(greedy), "both outcomes occur"
    # Scoring the model's own greedy answer (where it ended with the end token) is always "correct".
    finished = [i for i, ids in enumerate(decoded.tokens) if len(ids) < 12]
    own = collate(
        [builder.scored(examples[i], tok.decode(decoded.tokens[i]).replace(" ", "")) for i in finished],
        tok.pad_token_id,
        sq,
        side=side,
    )
    with torch.no_grad():
        own_correct, _ = iv.answer_scores(model(**own.model_inputs()).logits, own)
    assert own_correct.all()


@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_scored_ablation_agrees_with_decoding_under_the_same_ablation(routing, mode):
    lab = routing
    examples = lab.examples[:24]
    states = iv.clean_states(lab.backend, lab.builder, examples)
    values = iv.ablation_values(states, mode, seed=0)
    variant = iv.Variant(lab.select(blocks=[1]).sites(), values)
    correct, _ = iv._answers(
        lab.backend, lab.builder, iv.scored_sequences(lab.builder, examples), [iv.Variant([]), variant]
    )
    decoded = iv.decode_with_edits(lab.backend, lab.builder, examples, variant)
    assert correct[1].tolist() == [d == ex.answer for d, ex in zip(decoded, examples)]
    intact = iv.decode_with_edits(lab.backend, lab.builder, examples, iv.Variant([]))
    assert correct[0].tolist() == [d == ex.answer for d, ex in zip(intact, examples)]


# -- ablation, knockout, interchange: routing vs ignoring ------------------------------------------
def _all_vs_intact(table: pd.DataFrame) -> tuple[float, float, float]:
    intact = table[table["scope"] == "intact"].iloc[0]
    every = table[table["scope"] == "all"].iloc[0]
    return intact["accuracy"], every["accuracy"], every["logprob_change"]


def test_the_ignoring_model_really_ignores_its_blocks(ignoring):
    """Precondition for the contrast below: removing every readout->block attention edge
    (in every layer, via the mask) leaves accuracy and the answer log-probs unchanged, and so does
    resample-ablating all blocks: the answer does not come from the blocks."""
    lab = ignoring
    table = iv.knockout(lab.backend, lab.builder, lab.examples)
    intact = table[table["knockout"] == "none"]["accuracy"].item()
    none = table[(table["knockout"] == "answer->block") & table["block"].isna()]["accuracy"].item()
    assert intact >= 0.9 and none == intact
    seqs = iv.scored_sequences(lab.builder, lab.examples)

    # Log-probs with the answer cut off from the blocks, the same way knockout does it.
    def cut(batch, var_idx, ex_idx):
        is_block = (batch.roles >= Role.BLOCK_BEGIN) & (batch.roles <= Role.BLOCK_END)
        blocked = (
            (batch.roles == Role.READOUT)[:, :, None] & is_block[:, None, :] & (var_idx == 1)[:, None, None]
        )
        batch.attention_mask.masked_fill_(blocked[:, None], torch.finfo(batch.attention_mask.dtype).min)

    def logprob(logits, batch, ex_idx):
        return iv.answer_scores(logits, batch)[1]

    lp = iv.run_variants(
        lab.backend,
        seqs,
        [iv.Variant([]), iv.Variant([])],
        logprob,
        lab.tokenizer.pad_token_id,
        True,
        mask_edit=cut,
    )
    assert (lp[1] - lp[0]).abs().max() < 0.05


@pytest.mark.parametrize("mode", iv.ABLATIONS)
def test_ablating_all_blocks_breaks_the_routing_model_only(routing, ignoring, mode):
    chance = routing.task.chance_accuracy() or 0.1  # gsm8k has none; the copy task's is 0.1
    intact, ablated, _ = _all_vs_intact(
        iv.ablate(routing.backend, routing.builder, routing.examples, routing.select(), mode=mode)
    )
    assert intact >= 0.7
    assert ablated <= chance + 0.25 and intact - ablated >= 0.45, (mode, intact, ablated)

    intact, ablated, change = _all_vs_intact(
        iv.ablate(ignoring.backend, ignoring.builder, ignoring.examples, ignoring.select(), mode=mode)
    )
    assert intact >= 0.9
    assert ablated >= intact - 0.04 and abs(change) < 0.1, (mode, intact, ablated, change)


def test_knockout_of_every_block_breaks_the_routing_model(routing):
    table = iv.knockout(routing.backend, routing.builder, routing.examples)
    intact = table[table["knockout"] == "none"]["accuracy"].item()
    none = table[(table["knockout"] == "answer->block") & table["block"].isna()]["accuracy"].item()
    assert intact >= 0.7 and none <= 0.35
    assert set(table["knockout"]) == {"none", "answer->block", "block->earlier"}
    assert table[table["knockout"] == "block->earlier"]["block"].tolist() == [2]


def test_interchange_on_the_routing_model_transfers_the_donor_answer(routing):
    table, pairs = iv.interchange(
        routing.backend, routing.builder, routing.examples, routing.select(), grid=False
    )
    every = table[table["swap"] == "all"].iloc[0]
    none = table[table["swap"] == "none"].iloc[0]
    assert len(pairs) >= 15
    assert none["to_A"] <= 0.1 and none["stays_B"] >= 0.7
    assert every["to_A"] >= 0.6 and every["to_A"] > every["stays_B"], every.to_dict()
