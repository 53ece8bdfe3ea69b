"""Interventions on memory blocks: padding invariance, patching against TransformerLens,
teacher-forced scoring against greedy decoding, and what ablation, knockout and interchange
show on a model that routes its answer through its blocks and on one that ignores them.

Models come from tests/fixtures.py (trained once per session, read-only here):
`tiny_runs` (copy task: rim routes the answer through its blocks, pause ignores them) and
`tiny_modchain_runs` (variable-length modchain: padding, and the synthetic task patching needs).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import rim_lens as rl
from rim_lens.analysis import patching
from rim_lens.analysis.backends import make_backend
from rim_lens.analysis.engine import (
    Knockout,
    Variant,
    answer_scores,
    correct_and_logprob,
    decode,
    score,
    sweep,
)
from rim_lens.analysis.interventions import ABLATIONS, Intervention, ablation
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.sites import block_index
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import Role, block_positions

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


class Shifted(Intervention):
    """A fitted intervention seen from a one-example run of its target `offset` (which the engine
    numbers 0): a user-written intervention, as the interventions module describes."""

    kind = "shifted-for-tests"

    def __init__(self, inner: Intervention, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def __call__(self, base, site, rows):
        return self.inner(base, site, rows + self.offset)


def alone(variant: Variant, i: int) -> Variant:
    return Variant(variant.sites, variant.intervention and Shifted(variant.intervention, i), variant.knockout)


# -- padding invariance ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rim", "pause"])
@pytest.mark.parametrize("mode", ABLATIONS)
def test_ablation_per_example_does_not_depend_on_padding(chains, name, mode):
    lab = chains[name].with_examples(mixed_lengths(chains[name]))
    be, builder, examples = lab.backend, lab.builder, lab.examples
    sel = lab.select()
    states = lab.states(examples, sel.layers).states
    singles = torch.cat([lab.states([ex], sel.layers).states for ex in examples])
    torch.testing.assert_close(states, singles, rtol=0, atol=ATOL)
    fitted = lab.fit(ablation(mode, seed=1), examples, sel)
    specs = [[], sel.sites(), sel.sites(blocks=[1]), sel.sites(layers=[lab.backend.n_layers - 1])]
    variants = [Variant(s, fitted if s else None) for s in specs]
    seqs = [builder.scored(ex) for ex in examples]

    # Left padding (the engine), several examples and variants per pass.
    batched = sweep(be, builder, seqs, variants, correct_and_logprob)
    one_by_one = torch.stack(
        [
            sweep(be, builder, [seqs[i]], [alone(v, i) for v in variants], correct_and_logprob)[:, 0]
            for i in range(len(seqs))
        ],
        1,
    )
    assert (batched[..., 0] == one_by_one[..., 0]).all()
    torch.testing.assert_close(batched[..., 1], one_by_one[..., 1], rtol=0, atol=ATOL)
    assert (batched[0, :, 1] != batched[1, :, 1]).any(), "ablating every block must change something"

    # lab.ablate reports the means over examples of these per-example values.
    table = lab.ablate(mode=mode, seed=1).table
    for scope, v in (("intact", 0), ("all", 1)):
        row = table[table["scope"] == scope].iloc[0]
        assert row["accuracy"] == pytest.approx(one_by_one[v, :, 0].mean().item())
        assert row["logprob"] == pytest.approx(one_by_one[v, :, 1].mean().item(), abs=ATOL)

    # Right padding: the same edits, placed by the builder's block positions.
    batch = builder.collate(seqs, side="right")
    assert (batch.roles[:, -1] == Role.PAD).any()
    rows = torch.arange(len(examples))
    for v, variant in enumerate(variants):
        correct, logprob = answer_scores(
            be.forward(batch, edits=variant.edits(batch, rows, rows)).logits, batch
        )
        assert (correct.float() == one_by_one[v, :, 0]).all()
        torch.testing.assert_close(logprob, one_by_one[v, :, 1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["rim", "pause"])
def test_patching_per_example_does_not_depend_on_padding(chains, name):
    lab = chains[name]
    be, builder = lab.backend, lab.builder
    pairs = patching.make_pairs(lab, mixed_lengths(lab, 12), seed=0)
    assert len({len(builder.prompt(ex)) for ex in pairs.clean}) > 1
    sel = lab.select()
    fitted = lab.fit(rl.Patch(from_=pairs.clean), pairs.corrupt, sel)
    variants = [Variant()] + [
        Variant(sel.sites(blocks=[k], layers=[l]), fitted) for l in sel.layers for k in sel.blocks
    ]
    seqs = pairs.prompts(builder)
    metric = patching.logit_diff(pairs)
    batched = sweep(be, builder, seqs, variants, metric)
    one_by_one = torch.stack(
        [
            sweep(
                be,
                builder,
                [seqs[i]],
                [alone(v, i) for v in variants],
                lambda lg, b, ex, i=i: metric(lg, b, ex + i),
            )[:, 0]
            for i in range(len(seqs))
        ],
        1,
    )
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=ATOL)
    # Right padding: each row's metric at its own last token.
    batch = builder.collate(seqs, side="right")
    assert (batch.roles[:, -1] == Role.PAD).any()
    rows = torch.arange(len(seqs))
    last = (batch.roles != Role.PAD).sum(1) - 1
    for v, variant in enumerate(variants):
        logits = be.forward(batch, edits=variant.edits(batch, rows, rows)).logits[rows, last]
        ld = logits[rows, pairs.clean_token] - logits[rows, pairs.corrupt_token]
        torch.testing.assert_close(ld, one_by_one[v], rtol=0, atol=ATOL)
    # The patching table is the mean over pairs of these per-example values.
    result = patching.patch(lab, sel, pairs=pairs)
    torch.testing.assert_close(
        torch.tensor(result.table["logit_diff"].values, dtype=torch.float32),
        one_by_one[1:].mean(1),
        rtol=0,
        atol=ATOL,
    )
    assert result.summary["logit_diff_corrupt"] == pytest.approx(one_by_one[0].mean().item(), abs=ATOL)
    assert result.record["options"]["intervention"]["kind"] == "patch"


# -- patching against TransformerLens --------------------------------------------------------------
@pytest.fixture(scope="module")
def random_labs(tmp_path_factory) -> dict[str, Lab]:
    """Untrained GPT-2 and Llama checkpoints with large random weights (every position matters),
    readout seeing the question."""
    from fixtures import random_checkpoint

    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint

    labs = {}
    for arch in ("gpt2", "llama"):
        path = random_checkpoint(tmp_path_factory.mktemp("random") / arch, arch, seed=1)
        model, tok, spec = load_checkpoint(path)
        task = get_task("modchain", min_length=2, max_length=2)
        labs[arch] = Lab.from_model(model, tok, spec, task.generate(4, seed=2), task=task, model_dir=path)
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
        pairs = patching.Pairs([clean], [corrupt], [[]], torch.tensor(a[:1]), torch.tensor(b[:1]))
    else:
        pairs = patching.make_pairs(lab, lab.examples[:1], seed=0)
    assert len(pairs.clean) == 1 and lab.spec.readout_sees_question
    sel = lab.select()
    result = patching.patch(lab, sel, per_slot=True, pairs=pairs)
    table, base = result.table, result.summary

    clean_seq, corrupt_seq = pairs.prompts(builder, "clean")[0], pairs.prompts(builder, "corrupt")[0]
    for seq in (clean_seq, corrupt_seq):
        assert seq.positions == list(range(len(seq))), "plain causal positions"
    clean_tokens, corrupt_tokens = torch.tensor([clean_seq.ids]), torch.tensor([corrupt_seq.ids])
    bridge = make_backend("tl", lab.model, lab.tokenizer, lab.backend.model_dir).bridge
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

    pos = block_positions(builder.collate([corrupt_seq]))[0]  # [K, M + 2]
    expected = torch.tensor(
        [grid[r.layer, pos[block_index(r.block), r.slot]].item() for r in table.itertuples()]
    )
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
@pytest.mark.parametrize("run", ["rim", "pause", "direct", "chain-rim", "chain-direct"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_scores_agree_with_greedy_decoding(tiny_runs, tiny_modchain_runs, run, side):
    family, _, name = run.rpartition("-")
    run_dir = (tiny_modchain_runs if family == "chain" else tiny_runs)[name]
    lab = Lab.open(run_dir, n=48)
    model, tok, builder, examples = lab.model, lab.tokenizer, lab.builder, lab.examples
    batch = builder.collate([builder.scored(ex) for ex in examples], side=side)
    with torch.no_grad():
        correct, logprob = answer_scores(model(**batch.model_inputs()).logits, batch)
    decoded = greedy_decode(
        model,
        [builder.prompt(ex) for ex in examples],
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=12,
        sees_question=lab.spec.readout_sees_question,
    )
    greedy = [ids == builder.encode(ex.answer) for ids, ex in zip(decoded.tokens, examples)]
    assert correct.tolist() == greedy
    assert (logprob <= 0).all()
    if run == "chain-direct":  # the others can be right on all 48, which would test less
        assert 0 < sum(greedy) < len(greedy), "both outcomes occur"
    # Scoring the model's own greedy answer (where it ended with the end token) is always "correct".
    finished = [i for i, ids in enumerate(decoded.tokens) if len(ids) < 12]
    own = builder.collate(
        [builder.scored(examples[i], tok.decode(decoded.tokens[i]).replace(" ", "")) for i in finished],
        side=side,
    )
    with torch.no_grad():
        own_correct, _ = answer_scores(model(**own.model_inputs()).logits, own)
    assert own_correct.all()
    # The engine's decoding (no KV cache, through the backend) gives greedy_decode's tokens.
    assert decode(lab.backend, builder, examples, max_new_tokens=12).tokens == decoded.tokens
    assert lab.accuracy().value == pytest.approx(sum(greedy) / len(greedy))


@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_scored_ablation_agrees_with_decoding_under_the_same_ablation(routing, mode):
    lab = routing.with_examples(routing.examples[:24])
    sel = lab.select(blocks=[1])
    fitted = lab.fit(ablation(mode, seed=0), lab.examples, sel)
    correct, _ = score(lab.backend, lab.builder, lab.examples, [Variant(), Variant(sel.sites(), fitted)])
    decoded = lab.decode(ablation(mode, seed=0), blocks=[1])
    assert correct[1].tolist() == [d == ex.answer for d, ex in zip(decoded.answers, lab.examples)]
    assert decoded.record["options"]["intervention"] == {
        "kind": mode,
        **({"seed": 0} if mode == "resample" else {}),
    }
    intact = lab.decode()
    assert correct[0].tolist() == [d == ex.answer for d, ex in zip(intact.answers, lab.examples)]
    assert intact.table["correct"].tolist() == correct[0].tolist()


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
    table = lab.knockout().table
    intact = table[table["knockout"] == "none"]["accuracy"].item()
    none = table[(table["knockout"] == "answer->block") & table["block"].isna()]["accuracy"].item()
    assert intact >= 0.9 and none == intact
    # Log-probs with the answer cut off from the blocks, the same way knockout does it.
    _, lp = score(
        lab.backend, lab.builder, lab.examples, [Variant(), Variant(knockout=Knockout("answer->block"))]
    )
    assert (lp[1] - lp[0]).abs().max() < 0.05


@pytest.mark.parametrize("mode", ABLATIONS)
def test_ablating_all_blocks_breaks_the_routing_model_only(routing, ignoring, mode):
    chance = routing.task.chance_accuracy() or 0.1  # gsm8k has none; the copy task's is 0.1
    result = routing.ablate(mode=mode)
    intact, ablated, _ = _all_vs_intact(result.table)
    assert intact >= 0.7
    assert ablated <= chance + 0.25 and intact - ablated >= 0.45, (mode, intact, ablated)
    # With intervals: the drop is beyond both, and the record says what was done.
    assert result.accuracy("all").below(result.accuracy("intact")) and result.drop().above(0.3)
    assert result.record["options"]["intervention"]["kind"] == mode

    intact, ablated, change = _all_vs_intact(ignoring.ablate(mode=mode).table)
    assert intact >= 0.9
    assert ablated >= intact - 0.04 and abs(change) < 0.1, (mode, intact, ablated, change)


def test_knockout_of_every_block_breaks_the_routing_model(routing):
    result = routing.knockout()
    table = result.table
    intact = table[table["knockout"] == "none"]["accuracy"].item()
    none = table[(table["knockout"] == "answer->block") & table["block"].isna()]["accuracy"].item()
    assert intact >= 0.7 and none <= 0.35
    assert set(table["knockout"]) == {"none", "answer->block", "block->earlier"}
    assert table[table["knockout"] == "block->earlier"]["block"].tolist() == [2]
    assert result.accuracy("answer->block", None).below(result.accuracy("none"))


def test_interchange_on_the_routing_model_transfers_the_donor_answer(routing):
    result = routing.interchange(grid=False)
    table, pairs = result.table, result.pairs
    every = table[table["swap"] == "all"].iloc[0]
    none = table[table["swap"] == "none"].iloc[0]
    assert len(pairs) >= 15
    assert none["to_A"] <= 0.1 and none["stays_B"] >= 0.7
    assert every["to_A"] >= 0.6 and every["to_A"] > every["stays_B"], every.to_dict()
    assert result.transfer("all").above(routing.task.chance_accuracy() or 0.1)
