"""Greedy decoding's plain causal path: a RiM whose readout sees the question decodes as any causal
LM does (no custom mask), and gives the tokens and logits of the role-masked decoding and of
`AutoModelForCausalLM.generate`; a question-blind RiM keeps the role mask.
"""

from __future__ import annotations

import json

import pytest
import torch

from rim_lens.data.tasks import get_task
from rim_lens.model.checkpoints import load_checkpoint
from rim_lens.model.decoding import greedy_decode, plain_causal
from rim_lens.model.layouts import SequenceBuilder

torch.set_num_threads(1)

ATOL = 1e-5
STEPS = 6


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def rim(request, tmp_path_factory):
    """An untrained RiM checkpoint (large random weights: distinct logits) and prompts of three
    lengths, for a readout that sees the question (`visible`) and one that does not (`blind`)."""
    from fixtures import random_checkpoint

    out = {}
    for name, sees in (("visible", True), ("blind", False)):
        path = random_checkpoint(
            tmp_path_factory.mktemp(f"{request.param}-{name}"),
            request.param,
            seed=3,
            K=3,
            M=2,
            readout_sees_question=sees,
        )
        model, tok, spec = load_checkpoint(path)
        builder = SequenceBuilder(tok, spec)
        examples = get_task("modchain", min_length=1, max_length=3).generate(6, seed=4)
        prompts = [builder.prompt(ex) for ex in examples]
        assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: padding is tested"
        out[name] = (model, tok, builder, prompts)
    return out


def decode_with_logits(model, tok, prompts, **options):
    """greedy_decode, and the last-position logits of every model call it made."""
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(output.logits[:, -1]))
    try:
        decoded = greedy_decode(
            model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=STEPS, **options
        )
    finally:
        handle.remove()
    return decoded, seen


@pytest.mark.parametrize("batch", ["one", "padded"])
def test_plain_causal_decoding_equals_the_role_masked_decoding(rim, batch):
    model, tok, builder, prompts = rim["visible"]
    prompts = prompts[:1] if batch == "one" else prompts
    assert plain_causal(prompts, sees_question=True)
    sees = builder.spec.readout_sees_question
    plain, plain_logits = decode_with_logits(model, tok, prompts, sees_question=sees)
    masked, masked_logits = decode_with_logits(model, tok, prompts, sees_question=sees, causal=False)
    assert plain.tokens == masked.tokens
    assert plain.forward_passes == masked.forward_passes == len(plain_logits)
    for a, b in zip(plain_logits, masked_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch", ["one", "padded"])
def test_plain_causal_decoding_equals_hf_generate(rim, batch):
    """The prompt of a question-visible RiM is an ordinary causal sequence: `generate` (greedy, the
    prompt's tokens alone, a 2D padding mask) gives the same tokens and scores."""
    model, tok, builder, prompts = rim["visible"]
    prompts = prompts[:1] if batch == "one" else prompts
    decoded, logits = decode_with_logits(model, tok, prompts, sees_question=True)
    inputs = builder.collate(prompts, side="left")
    mask = (inputs.roles != 0).long()
    out = model.generate(
        inputs.input_ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,  # rows run on past their end token, as greedy_decode's do
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, inputs.input_ids.shape[1] :]
    for row, ids in enumerate(decoded.tokens):
        ended = len(ids) < STEPS
        assert new[row, : len(ids)].tolist() == ids
        if ended:
            assert int(new[row, len(ids)]) == tok.eos_token_id
    for step, (a, b) in enumerate(zip(logits, out.scores)):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=f"step {step}")


def test_question_blind_rim_keeps_the_role_mask(rim):
    model, tok, builder, prompts = rim["blind"]
    assert not plain_causal(prompts[:1], sees_question=False), "the readout must not see the question"
    auto, auto_logits = decode_with_logits(model, tok, prompts, sees_question=False)
    masked, masked_logits = decode_with_logits(model, tok, prompts, sees_question=False, causal=False)
    assert auto.tokens == masked.tokens
    for a, b in zip(auto_logits, masked_logits):
        assert torch.equal(a, b)
    # Forcing the plain causal path lets the readout see the question: a different computation.
    forced, forced_logits = decode_with_logits(model, tok, prompts, sees_question=False, causal=True)
    assert not torch.allclose(forced_logits[0], masked_logits[0], atol=1e-3)


def test_a_tl_backend_leaves_the_model_decoding_as_before(rim, tmp_path):
    """Booting a TransformerBridge swaps the HF model's modules for bridge components whose attention
    ignores transformers 5's KV cache: the tl backend boots on a copy, so the model decodes as before."""
    from rim_lens.analysis.backends import make_backend
    from rim_lens.model.checkpoints import save_checkpoint

    model, tok, builder, prompts = rim["visible"]
    before, before_logits = decode_with_logits(model, tok, prompts, sees_question=True)
    backend = make_backend("tl", model, tok, save_checkpoint(model, tok, builder.spec, tmp_path / "model"))
    assert backend.bridge.original_model is not model
    after, after_logits = decode_with_logits(model, tok, prompts, sees_question=True)
    assert after.tokens == before.tokens
    for a, b in zip(after_logits, before_logits):
        assert torch.equal(a, b)


def test_latency_side_by_side_measures_runs_on_the_same_examples(tiny_runs):
    """One interleaved measurement of several runs: the same examples for all, each answer decoded
    as the run's method decodes (tokens and passes as greedy decoding gives them), medians with
    their quartiles; the comparison table takes its latency columns from it (no timing asserted)."""
    from rim_lens.analysis.lab import Lab
    from rim_lens.compare import comparison, latency_side_by_side

    runs = {name: tiny_runs[name] for name in ("direct", "rim", "pause")}
    measured = latency_side_by_side(runs, n=6, warmup=1, max_new_tokens=8)
    assert list(measured["runs"]) == ["direct", "rim", "pause"] and len(measured["examples"]) == 6
    assert measured["threads"] >= 1 and len(measured["load_average"]) == 2
    for name, r in measured["runs"].items():
        assert r["n"] == 6 and r["max_new_tokens"] == 8
        assert 0 < r["ttft_ms"] <= r["latency_ms"]
        assert r["ttft_iqr_ms"][0] <= r["ttft_ms"] <= r["ttft_iqr_ms"][1]
        assert r["latency_iqr_ms"][0] <= r["latency_ms"] <= r["latency_iqr_ms"][1]
        lab = Lab.open(runs[name], n=None)
        chosen = [ex for ex in lab.examples if ex.id in measured["examples"]]
        decoded = [
            greedy_decode(
                lab.model,
                [lab.builder.prompt(ex)],
                eos_id=lab.tokenizer.eos_token_id,
                pad_id=lab.tokenizer.pad_token_id,
                max_new_tokens=8,
                sees_question=lab.spec.readout_sees_question,
            )
            for ex in chosen
        ]
        assert r["answer_tokens"] == pytest.approx(sum(len(d.tokens[0]) for d in decoded) / 6)
        assert r["forward_passes"] == pytest.approx(sum(d.forward_passes for d in decoded) / 6)
    metrics = {name: json.loads((path / "metrics.json").read_text()) for name, path in runs.items()}
    rows = {row["method"]: row for row in comparison(metrics, measured)}
    for name, r in measured["runs"].items():
        assert rows[name]["ttft_ms"] == r["ttft_ms"] and rows[name]["latency_ms"] == r["latency_ms"]
    timed = measured["runs"]
    assert rows["rim"]["latency_vs_direct"] == pytest.approx(
        timed["rim"]["latency_ms"] / timed["direct"]["latency_ms"]
    )
