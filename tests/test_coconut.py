"""Coconut: continuous-thought passes against a manual feed-back loop, the stage curriculum, cached
decoding against recomputation, what an intervention on thought k means, and a tiny end-to-end
run (learning, metrics keys, checkpoint round trip).

The independent reference everywhere is the plain definition: one example at a time, no cache,
no padding; the input at thought k's position is the final-norm hidden state of the position
before it, obtained by running the model on the prefix that precedes it.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager, nullcontext
from functools import partial

import pytest
import torch
from fixtures import COCONUT_CHAIN_OPTIONS, COCONUT_THOUGHTS, random_coconut

from rim_lens.artefacts import split_file
from rim_lens.data import read_examples
from rim_lens.data.tasks import get_task
from rim_lens.errors import ConfigError
from rim_lens.evaluation import evaluate
from rim_lens.fileio import read_jsonl
from rim_lens.methods import get_method
from rim_lens.model import coconut
from rim_lens.model.checkpoints import load_checkpoint
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import (
    Layout,
    Role,
    SequenceBuilder,
    block_positions,
    collate,
    slot_names,
    visibility,
)
from rim_lens.schedules import coconut_stage
from training.config import load_config
from training.trainer import plan_stages, train

torch.set_num_threads(1)
CHAIN_OPTIONS, N_THOUGHTS = COCONUT_CHAIN_OPTIONS, COCONUT_THOUGHTS


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """(model, tokenizer, builder) of an untrained Coconut checkpoint with large random weights,
    so that every thought moves the logits."""
    model, tok, spec, task = random_coconut(tmp_path_factory.mktemp("coconut") / "model", request.param)
    return model, tok, SequenceBuilder(tok, spec, task.join_steps)


@pytest.fixture(scope="module")
def chains():
    """Chains of 1-4 steps: questions of different lengths, so rows are padded differently."""
    examples = get_task("modchain", **CHAIN_OPTIONS).generate(6, seed=7)
    assert len({len(ex.question.split()) for ex in examples}) > 1
    return examples


# -- the independent reference -------------------------------------------------------------------
@torch.no_grad()
def manual_thoughts(model, seq: Layout, edit: dict[int, torch.Tensor] | None = None):
    """(input embeddings with every thought filled in [1, S, d], the thoughts [n, d]): thought k
    is the last hidden state of a fresh run on everything before its position. `edit` replaces
    thought k by a given vector before the later ones are computed."""
    ids, pos = torch.tensor([seq.ids]), torch.tensor([seq.positions])
    embeds = model.get_input_embeddings()(ids).clone()
    thoughts = []
    for k, p in enumerate((i for i, r in enumerate(seq.roles) if r == Role.THOUGHT), start=1):
        out = model(inputs_embeds=embeds[:, :p], position_ids=pos[:, :p], output_hidden_states=True)
        state = out.hidden_states[-1][0, -1]
        if edit and k in edit:
            state = edit[k]
        embeds[0, p] = state
        thoughts.append(state)
    return embeds, torch.stack(thoughts) if thoughts else torch.zeros(0, embeds.shape[-1])


@torch.no_grad()
def manual_logits(model, seq: Layout, edit=None) -> torch.Tensor:
    embeds, _ = manual_thoughts(model, seq, edit)
    return model(inputs_embeds=embeds, position_ids=torch.tensor([seq.positions])).logits[0]


@torch.no_grad()
def manual_decode(model, seq: Layout, eos_id: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy decoding recomputing the whole sequence at every step: no cache, no padding."""
    embeds, _ = manual_thoughts(model, seq)
    emb = model.get_input_embeddings()
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if nxt == eos_id:
            return out, True
        out.append(nxt)
        embeds = torch.cat([embeds, emb(torch.tensor([[nxt]]))], 1)
    return out, False


def training_layouts(builder, examples):
    """Layouts with 0..3 thoughts and every kind of step replacement, mixed in one batch."""
    plan = [(3, 1), (0, 0), (2, None), (3, 2), (1, 1), (2, 2)]
    return [builder.thoughts(ex, n, skip) for ex, (n, skip) in zip(examples, plan)]


# -- the thought passes --------------------------------------------------------------------------
@torch.no_grad()
def test_thought_passes_equal_a_manual_feedback_loop(tiny, chains):
    model, tok, builder = tiny
    seqs = training_layouts(builder, chains)
    out = coconut.thought_forward(model, collate(seqs, tok.pad_token_id))
    assert out.passes == 3 + 1, "n thoughts take n + 1 passes"
    for row, seq in enumerate(seqs):
        ref = manual_logits(model, seq)
        assert ref.abs().max() > 1.0, "logits far from zero: the comparison is not vacuous"
        torch.testing.assert_close(out.logits[row, : len(seq)], ref, atol=1e-5, rtol=0)
        _, thoughts = manual_thoughts(model, seq)
        n = len(thoughts)
        torch.testing.assert_close(out.thoughts[row, :n], thoughts, atol=1e-5, rtol=0)
        assert not out.thoughts[row, n:].any(), "rows with fewer thoughts get zeros there"
    # Feeding the `<thought>` token's own embedding instead (one ordinary pass) is not the same.
    plain = model(**collate(seqs[:1], tok.pad_token_id).model_inputs()).logits[0]
    assert (plain - manual_logits(model, seqs[0])).abs().max() > 1e-2


@torch.no_grad()
def test_alignment_is_internal_and_left_padding_gives_the_same(tiny, chains):
    model, tok, builder = tiny
    seqs = [builder.prompt(ex) for ex in chains]
    right = coconut.thought_forward(model, collate(seqs, tok.pad_token_id, side="right"))
    left = coconut.thought_forward(model, collate(seqs, tok.pad_token_id, side="left"))
    width = left.logits.shape[1]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(
            right.logits[row, : len(seq)], left.logits[row, width - len(seq) :], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(right.thoughts, left.thoughts, atol=1e-5, rtol=0)


def test_gradients_flow_through_the_thoughts(tiny, chains):
    """Training backpropagates through the fed-back states, as the reference does: the loss
    after <eot> reaches the weights through every thought pass."""
    model, tok, builder = tiny
    seq = builder.thoughts(chains[0], 2, 1)
    batch = collate([seq], tok.pad_token_id)
    fed = []

    def keep(k, state):
        state.retain_grad()
        fed.append(state)
        return state

    out = coconut.thought_forward(model, batch, intervene=keep)
    loss = torch.nn.functional.cross_entropy(out.logits[0], batch.targets[0], ignore_index=-100)
    loss.backward()
    model.zero_grad(set_to_none=True)
    assert len(fed) == 2 and all(s.grad is not None and s.grad.abs().sum() > 0 for s in fed)


# -- layouts and the stage schedule --------------------------------------------------------------
def test_layout_labels_and_mask(tiny, chains):
    _, tok, builder = tiny
    ex = chains[0]
    seq = builder.thoughts(ex, 4, 1)
    roles = [Role(r) for r in seq.roles]
    q = roles.index(Role.BOT)
    assert roles[q : q + 6] == [Role.BOT] + [Role.THOUGHT] * 4 + [Role.EOT]
    assert seq.blocks[q : q + 6] == [0, 1, 2, 3, 4, 4] and seq.slots[q : q + 6] == [-1, 0, 0, 0, 0, -1]
    assert tok.convert_ids_to_tokens(seq.ids[q : q + 6]) == ["<bot>"] + ["<thought>"] * 4 + ["<eot>"]
    assert seq.positions == list(range(len(seq))), "no gaps: thoughts take ordinary positions"
    # The mask is plainly causal: every position sees everything before it.
    allowed = visibility(torch.tensor([seq.roles]), torch.tensor([seq.blocks]), True)[0]
    assert torch.equal(allowed, torch.ones(len(seq), len(seq), dtype=torch.bool).tril())
    # Thoughts are addressed as (block k, slot 0), like memory blocks.
    pos = block_positions(collate([builder.prompt(e) for e in chains[:3]], tok.pad_token_id, side="left"))
    assert pos.shape == (3, N_THOUGHTS, 1)
    assert slot_names(builder.spec) == ["<thought>"]


def test_stage_schedule_replaces_the_right_steps(tiny, chains):
    _, tok, builder = tiny
    assert [coconut_stage(s, c=2, stages=3) for s in range(5)] == [(0, 0), (2, 1), (4, 2), (6, 3), (6, None)]
    assert [coconut_stage(s, c=1, stages=6)[0] for s in range(8)] == [0, 1, 2, 3, 4, 5, 6, 6]
    with pytest.raises(ValueError):
        coconut_stage(5, c=2, stages=3)

    cfg = load_config(
        None,
        {
            "method": "coconut",
            "task": {"name": "modchain", "options": CHAIN_OPTIONS},
            "train": {"steps": 100},
            "coconut": {"c": 2, "stages": 3, "stage_fraction": 0.2},
        },
    )
    stages = plan_stages(cfg, builder)
    assert [s.name for s in stages] == ["stage_0", "stage_1", "stage_2", "stage_3", "stage_4"]
    assert [s.steps for s in stages] == [20, 20, 20, 20, 20] and sum(s.steps for s in stages) == 100
    assert all(s.thought_passes and s.lr == cfg.train.lr for s in stages)
    # A longer stage 0 (the reference's GSM8K protocol starts from a trained CoT model); a stage
    # left without steps is dropped.
    longer = dataclasses.replace(cfg, coconut=dataclasses.replace(cfg.coconut, cot_fraction=0.4))
    assert [(s.name, s.steps) for s in plan_stages(longer, builder)] == [
        ("stage_0", 40),
        ("stage_1", 20),
        ("stage_2", 20),
        ("stage_3", 20),
    ]

    ex = max(chains, key=lambda e: len(e.steps))
    T = len(ex.steps)
    assert T >= 3
    prefix = builder.spec.answer_prefix
    for s, stage in enumerate(stages):
        seq = stage.layout(ex)
        n_thoughts = seq.roles.count(Role.THOUGHT)
        assert n_thoughts == 2 * min(s, 3)
        # The target read after <eot>: the steps not replaced, then the prefix, the answer, the end.
        kept = ex.steps[s:] if s <= 3 else ()
        assert squeeze(tok.decode([t for t in seq.targets if t != -100])) == squeeze(
            " ".join([*kept, prefix, ex.answer, tok.eos_token])
        )
        assert seq.targets[seq.roles.index(Role.EOT)] != -100, "the first target is predicted at <eot>"
        assert all(t == -100 for t, r in zip(seq.targets, seq.roles) if r != Role.EOT and r != Role.READOUT)
    # A short example loses all its steps early and still gets s x c thoughts (pad_latent_to_max).
    short = min(chains, key=lambda e: len(e.steps))
    assert len(short.steps) == 1
    seq = stages[2].layout(short)
    assert seq.roles.count(Role.THOUGHT) == 4
    assert squeeze(tok.decode([t for t in seq.targets if t != -100])) == squeeze(
        f"{prefix} {short.answer} {tok.eos_token}"
    )


def squeeze(text: str) -> str:
    """Text without spaces (the word-level tokenizer decodes digits one by one)."""
    return "".join(text.split())


def test_stage_fraction_must_leave_room(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: coconut\ncoconut:\n  stages: 3\n  stage_fraction: 0.3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4: coconut\.stage_fraction"):
        load_config(recipe)
    recipe.write_text("method: coconut\ncoconut:\n  stage_fraction: 0.25\n  cot_fraction: 0.3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: coconut\.stage_fraction: .*0\.3 \+ 3 x 0\.25 > 1"):
        load_config(recipe)
    recipe.write_text("method: coconut\ncoconut:\n  c: 0\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: coconut\.c: must be >= 1"):
        load_config(recipe)


# -- inference -----------------------------------------------------------------------------------
@torch.no_grad()
def test_decoding_with_kv_cache_equals_recomputation(tiny, chains):
    model, tok, builder = tiny
    prompts = [builder.prompt(ex) for ex in chains]
    assert len({len(p) for p in prompts}) > 1, "left padding is exercised"
    max_new = 6
    free = [manual_decode(model, p, -1, max_new)[0] for p in prompts]
    eos = free[0][2]  # a token the model really emits, so rows stop at different steps
    refs = [manual_decode(model, p, eos, max_new) for p in prompts]
    got = greedy_decode(model, prompts, eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=max_new)
    assert got.tokens == [r[0] for r in refs]
    steps = max(len(t) + 1 if stopped else max_new for t, stopped in refs)
    assert got.forward_passes == N_THOUGHTS + steps, "the thoughts count as forward passes"
    single = greedy_decode(model, prompts[1:2], eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=max_new)
    assert single.tokens == [refs[1][0]]


@torch.no_grad()
def test_prompts_with_different_thought_counts_cannot_share_a_cache(tiny, chains):
    model, tok, builder = tiny
    prompts = [builder.prompt(chains[0], 1), builder.prompt(chains[1], 3)]
    with pytest.raises(ValueError, match="same number of thoughts"):
        greedy_decode(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=2)


# -- interventions -------------------------------------------------------------------------------
@torch.no_grad()
def test_an_intervention_on_thought_k_propagates_to_the_later_thoughts(tiny, chains):
    model, tok, builder = tiny
    seqs = [builder.scored(ex) for ex in chains[:4]]
    batch = collate(seqs, tok.pad_token_id)
    clean = coconut.thought_forward(model, batch)
    k = 2
    donor = clean.thoughts.roll(1, 0)[:, k - 1]  # another example's thought k (a resample/patch)
    seen = []

    def patch(j, state):
        seen.append(j)
        return donor if j == k else state

    edited = coconut.thought_forward(model, batch, intervene=patch)
    assert seen == [1, 2, 3]
    torch.testing.assert_close(edited.thoughts[:, : k - 1], clean.thoughts[:, : k - 1])
    torch.testing.assert_close(edited.thoughts[:, k - 1], donor)
    # Thought k + 1 is computed from the patched thought k: it moves, exactly as in the manual loop.
    assert (edited.thoughts[:, k] - clean.thoughts[:, k]).abs().amax(-1).min() > 1e-3
    for row, seq in enumerate(seqs):
        ref = manual_logits(model, seq, edit={k: donor[row]})
        torch.testing.assert_close(edited.logits[row, : len(seq)], ref, atol=1e-5, rtol=0)
    # Teacher-forcing the clean thoughts reproduces the clean run; patching thought k alone with
    # the later thoughts held at their clean values is a different (single-position) edit.
    torch.testing.assert_close(
        coconut.forward_with_thoughts(model, batch, clean.thoughts), clean.logits, atol=1e-5, rtol=0
    )
    static = clean.thoughts.clone()
    static[:, k - 1] = donor
    held = coconut.forward_with_thoughts(model, batch, static)
    answer = batch.targets != -100
    assert (held[answer] - edited.logits[answer]).abs().max() > 1e-2


@torch.no_grad()
def test_pass_context_edits_a_thought_position_layerwise(tiny, chains):
    """A layer edit at thought k's position (index 0 of pass k) changes thought k + 1 onwards."""
    model, tok, builder = tiny
    batch = collate([builder.prompt(ex) for ex in chains[:3]], tok.pad_token_id, side="left")
    clean = coconut.thought_forward(model, batch)
    layer = model.transformer.h[1] if hasattr(model, "transformer") else model.model.layers[1]
    passes = []

    def shift_first_position(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        # Not a constant vector: every layer norm would remove that.
        hidden[:, 0] += torch.linspace(-1.0, 1.0, hidden.shape[-1])
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    @contextmanager
    def hooked():
        handle = layer.register_forward_pre_hook(shift_first_position, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def context(k):
        passes.append(k)
        return hooked() if k == 2 else nullcontext()

    edited = coconut.thought_forward(model, batch, pass_context=context)
    assert passes == [0, 1, 2, 3]
    torch.testing.assert_close(edited.thoughts[:, :2], clean.thoughts[:, :2])
    assert (edited.thoughts[:, 2] - clean.thoughts[:, 2]).abs().amax(-1).min() > 1e-3


@torch.no_grad()
def test_decoding_with_an_intervention(tiny, chains):
    model, tok, builder = tiny
    prompts = [builder.prompt(ex) for ex in chains]
    kwargs = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=4)
    clean = greedy_decode(model, prompts, **kwargs)
    same = greedy_decode(model, prompts, prefill=partial(coconut.prefill, intervene=lambda k, h: h), **kwargs)
    assert same.tokens == clean.tokens
    zeroed = greedy_decode(
        model, prompts, prefill=partial(coconut.prefill, intervene=lambda k, h: torch.zeros_like(h)), **kwargs
    )
    assert zeroed.tokens != clean.tokens


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coconut_run(tiny_runs, tmp_path_factory):
    """A Coconut run on the copy task of `tiny_runs` (same data, model size, batch and LR)."""
    from fixtures import _config

    data_dir = tiny_runs["direct"].parent / "data"
    data = {"train": str(data_dir / "train.txt"), "val": 20, "test": str(data_dir / "eval.txt")}
    cfg = _config("coconut", {}, 200, {"name": "gsm8k"}, data)
    cfg = dataclasses.replace(
        cfg, coconut=dataclasses.replace(cfg.coconut, c=1, stages=1, stage_fraction=0.5)
    )
    return train(cfg, tmp_path_factory.mktemp("coconut_run") / "coconut", overwrite=True)


def test_coconut_learns_the_copy_task_and_reports_like_the_others(coconut_run, tiny_runs):
    metrics = coconut_run.read_json("metrics.json")
    assert metrics["method"] == "coconut" and metrics["thoughts"] == 1
    assert metrics["accuracy"] > 0.5, metrics  # chance 0.1
    direct = json.loads((tiny_runs["direct"] / "metrics.json").read_text())
    assert set(metrics) == set(direct), "the same metrics keys as the other methods"
    # It writes the prefix, the answer and the end token; its prefill is 1 + 1 passes (one thought).
    assert metrics["answer_tokens_mean"] == 2
    assert metrics["forward_passes_mean"] == metrics["answer_tokens_mean"] + 1 + metrics["thoughts"]
    status = coconut_run.status()
    assert set(status["stages"]) == {"stage_0", "stage_1"}, "stage 2 (= stage 1 here) got no steps"
    coconut = get_method("coconut")
    assert coconut.color and coconut.uses_thoughts and not coconut.uses_blocks


def test_checkpoint_round_trips_and_evaluates(coconut_run):
    model, tok, spec = load_checkpoint(coconut_run.model_dir)
    assert (spec.method, spec.thoughts, spec.bot, spec.thought, spec.eot) == (
        "coconut",
        1,
        "<bot>",
        "<thought>",
        "<eot>",
    )
    assert tok.convert_tokens_to_ids(["<bot>", "<thought>", "<eot>"]) != [tok.unk_token_id] * 3
    test, _ = read_examples(coconut_run.path / split_file("test"), "gsm8k")
    metrics, predictions = evaluate(model, tok, spec, test, latency_examples=2)
    assert metrics["accuracy"] == coconut_run.read_json("metrics.json")["test_accuracy"]
    assert [p["prediction"] for p in predictions] == [
        p["prediction"] for p in read_jsonl(coconut_run.path / "predictions.jsonl")
    ]
    # forward_passes_mean counts the thoughts: batch-1 decoding agrees.
    builder = SequenceBuilder(tok, spec, get_task("gsm8k").join_steps)
    d = greedy_decode(
        model, [builder.prompt(test[0])], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=64
    )
    assert d.forward_passes == len(d.tokens[0]) + 1 + spec.thoughts


def test_demo_includes_coconut_in_its_table(tmp_path):
    from rim_lens.cli import build_parser
    from training.demo import run_demo

    # Opt-in for `make demo` (its 15-minute budget), chosen on the command line like any method.
    assert "coconut" not in build_parser().parse_args(["demo"]).methods.split(",")
    chosen = build_parser().parse_args(["demo", "--methods", "direct,cot,pause,rim,coconut"])
    assert "coconut" in chosen.methods.split(",")
    tiny_budget = [
        "data.train=300",
        "data.val=20",
        "data.test=20",
        "model.preset=tiny",
        "train.steps=6",
        "train.batch_size=16",
        "train.eval_every=6",
        "eval.latency_examples=1",
    ]
    summary = run_demo(tmp_path / "demo", methods=("direct", "coconut"), report=False, overrides=tiny_budget)
    assert [r["method"] for r in summary["rows"]] == ["direct", "coconut"]
    metrics = {
        m: json.loads((tmp_path / "demo" / m / "metrics.json").read_text()) for m in ("direct", "coconut")
    }
    assert set(metrics["coconut"]) == set(metrics["direct"]) and metrics["coconut"]["method"] == "coconut"
    assert metrics["coconut"]["thoughts"] == 4, "the demo recipe: c = 2, 2 stages"
    assert "| coconut |" in (tmp_path / "demo" / "summary.md").read_text()


@pytest.mark.trained
def test_thought_interventions_on_a_trained_two_step_chain(tmp_path):
    """Two chained modular operations, Coconut's curriculum end to end (CoT stage, then both steps
    replaced by continuous thoughts). What the model reaches is left to training: with other seeds,
    splits or CPUs this setting ended between 0.27 and 0.85 (direct about 0.19), so no accuracy is
    asserted. What holds on any trajectory: an identity intervention leaves every logit as it is,
    and replacing either thought by its mean over the batch reaches the answer's logits."""
    options = {"min_length": 2, "max_length": 2, "modulus": 10}
    cfg = load_config(
        None,
        {
            "method": "coconut",
            "task": {"name": "modchain", "options": options},
            "data": {"train": 4000, "val": 300, "test": 300, "seed": 1},
            "model": {"arch": "gpt2", "preset": "tiny", "max_positions": 64},
            "train": {
                "steps": 300,
                "batch_size": 64,
                "lr": 3e-3,
                "threads": 1,
                "eval_every": 300,
                "length_bucketing": False,
            },
            # A CoT stage long enough to learn the task first (the reference's GSM8K protocol).
            "coconut": {"c": 1, "stages": 2, "stage_fraction": 0.2, "cot_fraction": 0.6},
            "eval": {"latency_examples": 0, "score_test": False},
        },
    )
    run = train(cfg, tmp_path / "coconut")
    assert 0.0 <= run.read_json("metrics.json")["val_accuracy"] <= 1.0
    model, tok, spec = load_checkpoint(run.model_dir)
    val, _ = read_examples(run.path / split_file("val"), "modchain", task_options=options)
    builder = SequenceBuilder(tok, spec, get_task("modchain", **options).join_steps)
    batch = collate([builder.scored(ex) for ex in val], tok.pad_token_id)
    answer = batch.targets != -100

    def forward(intervene=None):
        with torch.no_grad():
            return coconut.thought_forward(model, batch, intervene=intervene)

    intact = forward()
    assert torch.equal(forward(lambda j, h: h).logits, intact.logits)
    mean = intact.thoughts.mean(0)
    for k in (1, 2):
        ablated = forward(lambda j, h, k=k: mean[j - 1].expand_as(h) if j == k else h)
        assert (ablated.logits[answer] - intact.logits[answer]).abs().max() > 1e-3, k
