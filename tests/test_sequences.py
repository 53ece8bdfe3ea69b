"""Sequence layouts: the packed RiM training sequence is exact, masks follow the visibility
rules, labels are right, and cached greedy decoding equals decoding without a cache.

"Exact" means: the readout-t logits of a packed, right-padded batch equal (within 1e-5) those of
running `[q][block_1..block_t][readout_t]` on its own as a plain causal sequence (no 4D mask,
default position ids 0..n-1), for GPT-2 and Llama. The references below are built from the
tokenizer and the memory spec directly, not from `SequenceBuilder`, so that a layout bug cannot
cancel out.
"""

from __future__ import annotations

import pytest
import torch

from rim_lens.data.tasks import get_task
from rim_lens.model.checkpoints import build_model
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import (
    IGNORE,
    Role,
    SequenceBuilder,
    additive_mask,
    block_positions,
    collate,
    slot_names,
    visibility,
)
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer

torch.set_num_threads(1)

ATOL = 1e-5
K = 5  # stage-2 blocks (any value works; small keeps the test fast)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples():
    """Variable-length chains and two multiplication sizes, mixed so that rows differ in length."""
    chains = get_task("modchain", min_length=1, max_length=4).generate(6, seed=3)
    mult2 = get_task("mult", n=2).generate(2, seed=4)
    mult3 = get_task("mult", n=3).generate(2, seed=5)
    return chains + mult2 + mult3


@pytest.fixture(scope="module")
def tokenizer(examples):
    texts = [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]
    return build_word_tokenizer(texts, MemorySpec())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    return build_model(tokenizer, request.param, "tiny", max_positions=512, seed=1).eval()


def join(task_name):
    return get_task(task_name).join_steps


def builder_for(tokenizer, spec, task_name="modchain"):
    return SequenceBuilder(tokenizer, spec, join(task_name))


# -- independent references ----------------------------------------------------------------------
def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def question_ids(tok, ex):
    return [tok.bos_token_id] + encode(tok, ex.question)


def block_ids(tok, spec):
    return tok.convert_tokens_to_ids(spec.block_tokens())


def answer_ids(tok, spec, ex):
    return encode(tok, spec.answer_prefix) + encode(tok, ex.answer) + [tok.eos_token_id]


def step_ids(tok, step):
    return encode(tok, step) + [tok.eos_token_id]


@torch.no_grad()
def reference_logits(model, q, blocks, target, sees_question):
    """Logits predicting `target` after `[q][blocks]`, with the readout written as a plain
    continuation: one row per target token.

    sees_question=True: ONE plain causal run of `[q][blocks][target[:-1]]`, no mask, default
    positions 0..n-1; the logits from the last block token onwards predict the target.

    sees_question=False cannot be a plain causal sequence (the blocks see the question, the
    readout must not). Its reference uses only standard Hugging Face machinery, no 4D mask:
    a plain causal prefill of `[q][blocks]` into a KV cache (the blocks see the question; the
    block-end token, which predicts the first target token, is a block token and sees it too),
    then the readout tokens fed on top of the cache with an ordinary 2D padding mask that is 0
    over the question, and position ids continuing from the prefix.
    """
    prefix = q + blocks
    readout = target[:-1]
    if sees_question:
        ids = torch.tensor([prefix + readout])
        return model(input_ids=ids).logits[0, len(prefix) - 1 :]
    out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    first = out.logits[0, -1:]
    if not readout:
        return first
    n = len(prefix)
    mask = torch.ones(1, n + len(readout), dtype=torch.long)
    mask[0, : len(q)] = 0
    rest = model(
        input_ids=torch.tensor([readout]),
        attention_mask=mask,
        position_ids=torch.arange(n, n + len(readout))[None],
        cache=out.cache,
        use_cache=True,
    ).logits[0]
    return torch.cat([first, rest])


@torch.no_grad()
def packed_logits(model, seqs, pad_id, sees_question):
    batch = collate(seqs, pad_id, sees_question, side="right")
    assert len({len(s) for s in seqs}) > 1, "rows must differ in length so that padding is exercised"
    return batch, model(**batch.model_inputs()).logits


def readout_rows(batch, row, t):
    return (batch.target_index[row] == t).nonzero().flatten()


VARIANTS = [(True, 0), (True, 1), (False, 0), (False, 1)]


# -- packing is exact ----------------------------------------------------------------------------
@pytest.mark.parametrize("sees_question,offset", VARIANTS)
def test_stage1_packed_readouts_equal_plain_causal_runs(model, tokenizer, examples, sees_question, offset):
    spec = MemorySpec(K=K, readout_sees_question=sees_question, step_offset=offset)
    seqs = [builder_for(tokenizer, spec, ex.task).grounding(ex) for ex in examples]
    batch, logits = packed_logits(model, seqs, tokenizer.pad_token_id, sees_question)
    blk = block_ids(tokenizer, spec)
    checked = 0
    for row, ex in enumerate(examples):
        targets = [step_ids(tokenizer, s) for s in ex.steps] + [answer_ids(tokenizer, spec, ex)]
        assert int(batch.target_index[row].max()) == len(targets)
        for t, target in enumerate(targets, start=1):
            ref = reference_logits(
                model, question_ids(tokenizer, ex), blk * (t + offset), target, sees_question
            )
            idx = readout_rows(batch, row, t)
            assert batch.targets[row, idx].tolist() == target
            got = logits[row, idx]
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
            checked += 1
    assert checked == sum(len(ex.steps) + 1 for ex in examples)


@pytest.mark.parametrize("sees_question", [True, False])
def test_stage2_packed_readouts_equal_plain_causal_runs(model, tokenizer, examples, sees_question):
    spec = MemorySpec(K=K, readout_sees_question=sees_question)
    seqs = [builder_for(tokenizer, spec, ex.task).refinement(ex) for ex in examples]
    batch, logits = packed_logits(model, seqs, tokenizer.pad_token_id, sees_question)
    blk = block_ids(tokenizer, spec)
    for row, ex in enumerate(examples):
        target = answer_ids(tokenizer, spec, ex)
        assert int(batch.target_index[row].max()) == K
        for k in range(1, K + 1):
            ref = reference_logits(model, question_ids(tokenizer, ex), blk * k, target, sees_question)
            idx = readout_rows(batch, row, k)
            assert batch.targets[row, idx].tolist() == target
            torch.testing.assert_close(logits[row, idx], ref, atol=ATOL, rtol=0)


def test_packed_without_position_ids_is_not_exact(model, tokenizer, examples):
    """Guard that the check above has teeth: dropping the explicit position ids breaks it."""
    spec = MemorySpec(K=K)
    ex = examples[3]
    seq = builder_for(tokenizer, spec, ex.task).refinement(ex)
    batch = collate([seq], tokenizer.pad_token_id)
    with torch.no_grad():
        wrong = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target = answer_ids(tokenizer, spec, ex)
    ref = reference_logits(model, question_ids(tokenizer, ex), block_ids(tokenizer, spec) * 1, target, True)
    assert (wrong[0, readout_rows(batch, 0, 1)] - ref).abs().max() > 1e-3


# -- visibility rules ----------------------------------------------------------------------------
@pytest.mark.parametrize("sees_question", [True, False])
@pytest.mark.parametrize("stage", [1, 2])
def test_visibility_rules(tokenizer, examples, sees_question, stage):
    spec = MemorySpec(K=K, readout_sees_question=sees_question, step_offset=1)
    seqs = [
        (
            builder_for(tokenizer, spec, ex.task).grounding(ex)
            if stage == 1
            else builder_for(tokenizer, spec, ex.task).refinement(ex)
        )
        for ex in examples
    ]
    batch = collate(seqs, tokenizer.pad_token_id, sees_question)
    allowed = visibility(batch.roles, batch.blocks, sees_question)
    B, S = batch.roles.shape
    roles, blocks = batch.roles, batch.blocks
    qr, kr = roles[:, :, None], roles[:, None, :]
    qb, kb = blocks[:, :, None], blocks[:, None, :]
    is_block = lambda r: (r >= Role.BLOCK_BEGIN) & (r <= Role.BLOCK_END)  # noqa: E731
    idx = torch.arange(S)
    later = idx[None, None, :] > idx[None, :, None]
    diag = (idx[None, :, None] == idx[None, None, :]).expand(B, S, S)
    pad_q, pad_k = qr == Role.PAD, kr == Role.PAD
    readout_q, readout_k = qr == Role.READOUT, kr == Role.READOUT

    assert not (allowed & later).any(), "nothing sees the future"
    assert not (allowed & is_block(qr) & readout_k).any(), "blocks never see readouts"
    assert not (allowed & readout_q & readout_k & (qb != kb)).any(), "readouts never see other readouts"
    assert not (allowed & readout_q & is_block(kr) & (kb > qb)).any(), (
        "a readout sees only blocks up to its own"
    )
    assert not (allowed & (qr == Role.QUESTION) & (is_block(kr) | readout_k)).any()
    assert not (allowed & ~pad_q & pad_k).any(), "no real token sees padding"
    # A padding query sees itself (no empty softmax row); what else it sees is irrelevant
    # since nothing reads its output (it is never a target and no real token sees it).
    assert allowed[diag & pad_q].all()
    assert allowed[diag.bool() & ~pad_q.expand(B, S, S)].all(), "every token sees itself"
    # What must be visible: causal question; blocks see question and blocks <= theirs; readouts
    # see their blocks, their own earlier tokens, and the question iff readout_sees_question.
    earlier = ~later
    must = earlier & (
        ((qr == Role.QUESTION) & (kr == Role.QUESTION))
        | (is_block(qr) & ((kr == Role.QUESTION) | (is_block(kr) & (kb <= qb))))
        | (readout_q & ((is_block(kr) & (kb <= qb)) | (readout_k & (kb == qb))))
    )
    assert allowed[must].all()
    sees_q = allowed & readout_q & (kr == Role.QUESTION)
    if sees_question:
        assert torch.equal(sees_q, readout_q & (kr == Role.QUESTION) & earlier)
    else:
        assert not sees_q.any(), "readout_sees_question=False: the question is hidden from readouts"
    real_q = ~pad_q.expand(B, S, S)
    assert torch.equal(allowed & real_q, (must | sees_q) & real_q), "nothing beyond the rules"

    mask = additive_mask(allowed)
    assert mask.shape == (B, 1, S, S) and mask.dtype == torch.float32
    assert (mask[:, 0][allowed] == 0).all()
    assert (mask[:, 0][~allowed] == torch.finfo(torch.float32).min).all()
    assert torch.equal(batch.attention_mask, mask)


# -- labels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0, 1])
def test_grounding_labels(tokenizer, examples, offset):
    M = 3
    spec = MemorySpec(M=M, K=K, step_offset=offset)
    ex = next(e for e in examples if e.task == "modchain" and len(e.steps) == 3)
    seq = builder_for(tokenizer, spec, ex.task).grounding(ex)
    q = question_ids(tokenizer, ex)
    n_blocks = len(ex.steps) + 1 + offset
    L = M + 2
    targets = [step_ids(tokenizer, s) for s in ex.steps] + [answer_ids(tokenizer, spec, ex)]
    nq = len(q)
    assert seq.ids[:nq] == q and seq.roles[:nq] == [Role.QUESTION] * nq
    assert seq.positions[:nq] == list(range(nq))
    block_part = slice(nq, nq + L * n_blocks)
    assert seq.ids[block_part] == block_ids(tokenizer, spec) * n_blocks
    assert seq.roles[block_part] == ([Role.BLOCK_BEGIN] + [Role.MEMORY] * M + [Role.BLOCK_END]) * n_blocks
    assert seq.blocks[block_part] == [k for k in range(1, n_blocks + 1) for _ in range(L)]
    assert seq.slots[block_part] == list(range(L)) * n_blocks
    assert seq.positions[block_part] == list(range(nq, nq + L * n_blocks))
    assert seq.slots[:nq] == [-1] * nq and seq.slots[nq + L * n_blocks :] == [-1] * (
        len(seq) - nq - L * n_blocks
    )
    assert seq.n_steps == len(ex.steps)
    # Readouts: in order t = 1..T+1, labelled with the block they read, positions continuing
    # from that block's end, whose end token predicts the readout's first token.
    i = nq + L * n_blocks
    for t, target in enumerate(targets, start=1):
        end = nq + L * (t + offset) - 1
        assert seq.roles[end] == Role.BLOCK_END and seq.blocks[end] == t + offset
        assert seq.targets[end] == target[0] and seq.target_index[end] == t
        n = len(target) - 1
        assert seq.ids[i : i + n] == target[:-1]
        assert seq.roles[i : i + n] == [Role.READOUT] * n
        assert seq.blocks[i : i + n] == [t + offset] * n
        assert seq.positions[i : i + n] == list(range(end + 1, end + 1 + n))
        assert seq.targets[i : i + n] == target[1:]
        assert seq.target_index[i : i + n] == [t] * n
        i += n
    assert i == len(seq)
    # Only the block ends that precede a readout carry a target.
    assert sum(tg != IGNORE for tg in seq.targets) == sum(len(tg) for tg in targets)
    assert slot_names(spec) == ["<b>", "m1", "m2", "m3", "</b>"]


def test_direct_cot_and_prompt_layouts(tokenizer, examples):
    ex = examples[0]
    q = question_ids(tokenizer, ex)
    direct = builder_for(tokenizer, MemorySpec(method="direct", K=0)).direct(ex)
    answer = answer_ids(tokenizer, MemorySpec(), ex)
    assert direct.ids == q + answer[:-1]
    assert direct.targets == [IGNORE] * (len(q) - 1) + answer
    assert direct.positions == list(range(len(direct)))
    assert Role.BLOCK_BEGIN not in direct.roles

    cot = builder_for(tokenizer, MemorySpec(method="cot", K=0)).cot(ex)
    steps = encode(tokenizer, join("modchain")(ex.steps))
    assert cot.ids == q + steps + answer[:-1]
    assert cot.targets[len(q) - 1 :] == steps + answer

    spec = MemorySpec(K=3)
    prompt = builder_for(tokenizer, spec).prompt(ex)
    prefix = encode(tokenizer, spec.answer_prefix)
    assert prompt.ids == q + block_ids(tokenizer, spec) * 3 + prefix
    assert prompt.positions == list(range(len(prompt)))
    assert prompt.roles[-len(prefix) :] == [Role.READOUT] * len(prefix)
    assert prompt.blocks[-len(prefix) :] == [3] * len(prefix)
    assert builder_for(tokenizer, spec).prompt(ex, n_blocks=1).ids == q + block_ids(tokenizer, spec) + prefix
    assert builder_for(tokenizer, MemorySpec(method="cot", K=0)).prompt(ex).ids == q


def test_block_positions(tokenizer, examples):
    spec = MemorySpec(M=2, K=4)
    b = builder_for(tokenizer, spec)
    chains = [ex for ex in examples if ex.task == "modchain"]
    prompts = [b.prompt(ex) for ex in chains]
    for side in ("left", "right"):
        batch = collate(prompts, tokenizer.pad_token_id, side=side)
        pos = block_positions(batch)
        assert pos.shape == (len(chains), 4, 4)
        rows = torch.arange(len(chains))[:, None, None]
        assert (batch.blocks[rows, pos] == torch.arange(1, 5)[None, :, None]).all()
        assert (batch.slots[rows, pos] == torch.arange(4)[None, None, :]).all()
        roles = batch.roles[rows, pos]
        assert (roles[:, :, 0] == Role.BLOCK_BEGIN).all() and (roles[:, :, -1] == Role.BLOCK_END).all()
        assert (roles[:, :, 1:-1] == Role.MEMORY).all()
        # Consecutive positions: a block is contiguous, blocks follow each other.
        assert (pos.flatten(1).diff(dim=1) == 1).all()
    mixed = collate([b.prompt(chains[0], 2), b.prompt(chains[1], 3)], tokenizer.pad_token_id)
    with pytest.raises(ValueError):
        block_positions(mixed)
    none = collate(
        [builder_for(tokenizer, MemorySpec(method="direct", K=0)).prompt(chains[0])], tokenizer.pad_token_id
    )
    assert block_positions(none).shape == (1, 0, 0)


# -- cached greedy decoding ----------------------------------------------------------------------
@torch.no_grad()
def decode_without_cache(model, seq, sees_question, eos_id, max_new_tokens):
    """Greedy decoding of one prompt with a full recomputation at every step, no cache, no
    padding: a plain causal run when the readout sees the question, else the single-row mask."""
    ids, roles, blocks = list(seq.ids), list(seq.roles), list(seq.blocks)
    out = []
    for _ in range(max_new_tokens):
        if sees_question:
            logits = model(input_ids=torch.tensor([ids])).logits
        else:
            mask = additive_mask(visibility(torch.tensor([roles]), torch.tensor([blocks]), False))
            logits = model(
                input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(len(ids))[None]
            ).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos_id:
            return out, True
        out.append(nxt)
        ids.append(nxt)
        roles.append(Role.READOUT)
        blocks.append(blocks[-1])
    return out, False


@pytest.mark.parametrize("method,sees_question", [("rim", True), ("rim", False), ("direct", True)])
def test_greedy_decode_with_cache_equals_decoding_without_cache(
    model, tokenizer, examples, method, sees_question
):
    spec = MemorySpec(method=method, K=3 if method == "rim" else 0, readout_sees_question=sees_question)
    b = builder_for(tokenizer, spec)
    prompts = [b.prompt(ex) for ex in examples[:6]]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: left padding is exercised"
    max_new = 6
    # An end token the model really emits, so rows stop at different steps: the token row 0
    # produces at its third step when nothing stops it.
    free = [decode_without_cache(model, p, sees_question, -1, max_new)[0] for p in prompts]
    eos = free[0][2]
    refs = [decode_without_cache(model, p, sees_question, eos, max_new) for p in prompts]
    got = greedy_decode(
        model,
        prompts,
        eos_id=eos,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new,
        sees_question=sees_question,
    )
    assert got.tokens == [r[0] for r in refs]
    steps = max(len(t) + 1 if stopped else max_new for t, stopped in refs)
    assert got.forward_passes == steps == len(got.step_times)
    assert got.step_times == sorted(got.step_times)
    # Batch 1 gives the same as the batch.
    single = greedy_decode(
        model,
        prompts[1:2],
        eos_id=eos,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new,
        sees_question=sees_question,
    )
    assert single.tokens == [refs[1][0]]
