"""Memory-safe training and evaluation (issue 10): logits only at target positions, the held-out
check in chunks, length-bucketed batches, gradient checkpointing, mixed precision, and inputs
built on the model's device."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rim_lens.data.tasks import get_task
from rim_lens.evaluation import DECODE_MARGIN, decode_budget, evaluate
from rim_lens.model.checkpoints import build_model, set_dropout
from rim_lens.model.decoding import greedy_decode
from rim_lens.model.layouts import IGNORE, SequenceBuilder, collate
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer, memory_token_ids
from rim_lens.schedules import grounding_weights
from training.config import load_config
from training.sampling import LengthBuckets
from training.stages import _loss, held_out_accuracy, predicted_tokens, readout_hits, target_logits
from training.trainer import _with_lora, train

OPTIONS = {"min_length": 1, "max_length": 4, "modulus": 10}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(arch: str, lora: bool = False, seed: int = 0):
    """A tiny random model (optionally LoRA-wrapped) and RiM grounding layouts of varied length."""
    task = get_task("modchain", **OPTIONS)
    spec = MemorySpec(method="rim", K=4, M=1, task="modchain")
    examples = task.generate(24, seed=seed)
    texts = [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]
    tok = build_word_tokenizer(texts + [str(d) for d in range(10)], spec)
    torch.manual_seed(seed)
    model = build_model(tok, arch, "tiny", max_positions=128, seed=seed)
    if lora:
        options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
        model = _with_lora(model, options, memory_token_ids(tok, spec))
        with torch.no_grad():  # LoRA's B starts at zero: make the adapter change the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    builder = SequenceBuilder(tok, spec, task.join_steps)
    layouts = [builder.grounding(ex) for ex in examples]
    assert len({len(x) for x in layouts}) > 3, "the layouts must differ in length"
    return model, tok, layouts


@pytest.mark.parametrize("arch, lora", [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_target_only_logits_give_the_full_logits_loss(arch, lora):
    model, tok, layouts = setup(arch, lora)
    model.train()
    batch = collate(layouts, tok.pad_token_id)
    weights = grounding_weights(batch.target_index, batch.n_steps, 0.6, 0.3)
    is_target = batch.targets != IGNORE
    assert 0 < is_target.float().mean() < 0.5, "most positions are not targets"

    full = model(**batch.model_inputs(), use_cache=False).logits
    ce = F.cross_entropy(full.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none")
    reference = (ce.view_as(weights) * weights).sum() / weights.sum()
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logits = target_logits(model, batch)
    assert logits.shape == (int(is_target.sum()), full.shape[-1])
    assert torch.allclose(logits, full[is_target], atol=1e-5)
    loss = _loss(model, batch, weights)
    assert abs(loss.item() - reference.item()) < 1e-5
    loss.backward()
    for name, p in model.named_parameters():
        if name in ref_grads:
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-5), name
    assert len(ref_grads) > 0


def test_chunked_held_out_check_equals_one_batch(tiny_modchain_runs):
    """On a trained RiM model, for both stages' layouts. What it reaches is left to training (it
    differs with the CPU's rounding); what is asserted holds on any CPU: each chunking gives the
    one batch's accuracies, and padding leaves every readout's logits as they are alone."""
    from rim_lens.data import read_examples
    from rim_lens.model.checkpoints import load_checkpoint

    run = tiny_modchain_runs["rim"]
    model, tok, spec = load_checkpoint(run / "model")
    examples = read_examples(run / "data" / "test.jsonl")[0]
    builder = SequenceBuilder(tok, spec, get_task("modchain", **OPTIONS).join_steps)
    batches = partial(collate, pad_id=tok.pad_token_id, sees_question=spec.readout_sees_question)
    sizes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(len(kw["input_ids"])), with_kwargs=True
    )
    try:
        for stage, layout in (("grounding", builder.grounding), ("refinement", builder.refinement)):
            layouts = [layout(ex) for ex in examples]
            with torch.no_grad():
                batch = batches(layouts)
                logits = model(**batch.model_inputs()).logits
                hits = readout_hits(logits.argmax(-1), batch, stage)
                for row, one in enumerate(layouts[:8]):  # alone, unpadded
                    alone = batches([one])
                    own = model(**alone.model_inputs()).logits[0][alone.target_index[0] > 0]
                    padded = logits[row][batch.target_index[row] > 0]
                    torch.testing.assert_close(padded, own, atol=1e-4, rtol=1e-4)
            one_batch = {name: sum(v) / len(v) for name, v in hits.items()}
            for chunk in (1, 7, len(layouts)):
                sizes.clear()
                model.train()
                chunked = held_out_accuracy(model, layouts, stage, batches, "cpu", chunk)
                assert chunked == one_batch
                assert max(sizes) == chunk and sum(sizes) == len(layouts)
                assert model.training, "the held-out check restores training mode"
            steps = sorted((n for n in chunked if n.startswith("step_")), key=lambda n: int(n[5:]))
            blocks = [f"block_{k}" for k in range(1, spec.K + 1)]
            assert list(chunked) == (steps + ["answer"] if stage == "grounding" else blocks)
    finally:
        hook.remove()


def test_chunked_predictions_equal_one_batch_with_lora():
    model, tok, layouts = setup("llama", lora=True, seed=1)
    model.eval()
    with torch.no_grad():
        batch = collate(layouts, tok.pad_token_id)
        reference = model(**batch.model_inputs()).logits.argmax(-1)[batch.targets != IGNORE]
        chunks = [collate(layouts[i : i + 5], tok.pad_token_id) for i in range(0, len(layouts), 5)]
        chunked = torch.cat([predicted_tokens(model, b)[b.targets != IGNORE] for b in chunks])
    assert torch.equal(chunked, reference)


def test_length_buckets_cover_every_example_once_with_similar_lengths():
    rng = torch.Generator().manual_seed(0)
    lengths = (torch.randint(5, 300, (1003,), generator=rng)).tolist()
    sampler = LengthBuckets(lengths, batch_size=16, seed=7, pool=8)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))
    assert len(epoch0) == len(sampler) == 63 and sum(len(b) < 16 for b in epoch0) == 1

    def padding(batches):  # the fraction of a padded batch that is padding
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / padded

    uniform = torch.randperm(1003, generator=rng).split(16)
    assert padding(epoch0) < 0.15 and padding([b.tolist() for b in uniform]) > 0.3
    # Deterministic given seed and epoch; a new order every epoch.
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(1003))
    again = LengthBuckets(lengths, batch_size=16, seed=7, pool=8)
    assert list(again) == epoch0 and list(again) == epoch1
    again.set_epoch(0)
    assert list(again) == epoch0
    assert list(LengthBuckets(lengths, 16, seed=8, pool=8)) != epoch0
    # drop_last: full batches only, every example at most once, a different few left out each epoch.
    dropping = LengthBuckets(lengths, 16, seed=7, drop_last=True)
    a, b = list(dropping), list(dropping)
    for batches in (a, b):
        flat = [i for x in batches for i in x]
        assert all(len(x) == 16 for x in batches) and len(flat) == len(set(flat)) == 1003 - 1003 % 16
    assert set(range(1003)) - {i for x in a for i in x} != set(range(1003)) - {i for x in b for i in x}


def test_accelerate_loader_advances_the_bucket_epoch():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    sampler = LengthBuckets(list(range(40)), batch_size=4, seed=0)
    loader = Accelerator(cpu=True).prepare(DataLoader(list(range(40)), batch_sampler=sampler))
    first = [b.tolist() for b in loader]
    second = [b.tolist() for b in loader]
    assert first == sampler.batches(0) and second == sampler.batches(1) and first != second


def _recipe(tmp_path, **train):
    from fixtures import copy_lines

    lines = copy_lines(200)
    (tmp_path / "train.txt").write_text("\n".join(lines[:160]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[160:]) + "\n")
    return {
        "method": "rim",
        "task": {"name": "gsm8k"},
        "data": {"train": str(tmp_path / "train.txt"), "val": 16, "test": str(tmp_path / "test.txt")},
        "model": {"arch": "llama", "preset": "tiny", "max_positions": 64},
        "memory": {"K": 2, "M": 1},
        "train": {"steps": 4, "batch_size": 8, "threads": 1, "log_every": 1, "eval_every": 2, **train},
        "eval": {"latency_examples": 0, "batch_size": 8},
    }


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    logs = {}
    for flag in (False, True):
        run = train(load_config(None, _recipe(tmp_path, gradient_checkpointing=flag)), tmp_path / str(flag))
        logs[flag] = [r["loss"] for r in run.read_log() if "loss" in r]
    assert len(logs[True]) == 4 and logs[True] == pytest.approx(logs[False], abs=1e-5)


def test_bf16_autocasts_and_fp16_needs_a_gpu(tmp_path, monkeypatch, capsys):
    from rim_lens.cli import main
    from training import stages

    seen, hooked = [], set()
    real = stages.output_layer

    def record(module, args, out):
        if module.training:
            seen.append(out.dtype)

    def spy(model):  # the dtype the output layer computes in while training
        layer = real(model)
        if id(layer) not in hooked:
            hooked.add(id(layer))
            layer.register_forward_hook(record)
        return layer

    monkeypatch.setattr(stages, "output_layer", spy)
    run = train(load_config(None, _recipe(tmp_path, precision="bf16")), tmp_path / "bf16")
    assert run.status()["status"] == "completed" and seen and set(seen) == {torch.bfloat16}
    # The saved model is plain fp32, and the next run in this process may use another precision.
    from safetensors import safe_open

    with safe_open(run.model_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    seen.clear()
    train(load_config(None, _recipe(tmp_path)), tmp_path / "fp32")
    assert set(seen) == {torch.float32}

    import yaml

    recipe = tmp_path / "fp16.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, precision="fp16")))
    capsys.readouterr()
    assert main(["train", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rim-lens: error: train.precision: fp16 needs a GPU; on a CPU use bf16 or fp32"]


def test_max_new_tokens_is_derived_from_training_and_validation_targets(tmp_path):
    cfg = load_config(None, _recipe(tmp_path, steps=2))
    assert cfg.eval.max_new_tokens is None
    run = train(cfg, tmp_path / "rim")
    metrics = run.read_json("metrics.json")
    # The copy task's answer is one digit: one answer token and the end of sequence.
    assert metrics["max_new_tokens"] == 2 + DECODE_MARGIN
    task = get_task("gsm8k")
    spec = MemorySpec(method="cot", K=0, M=1, task="gsm8k")
    long = task.parse_line("a b||<<1+2=3>> <<3*4=12>> <<12-5=7>> #### 7")
    short = task.parse_line("c||<<1=1>> #### 1")
    tok = build_word_tokenizer(["a b c 1 2 3 4 5 7 12 + * - = << >>", long.steps[0]], spec)
    cot = SequenceBuilder(tok, spec, task.join_steps)
    expected = len(cot.encode(" ".join(long.steps))) + len(cot.prefix) + len(cot.encode("7")) + 1
    assert decode_budget(cot, [short, long]) == expected + DECODE_MARGIN
    direct = SequenceBuilder(tok, spec.replace(method="direct"), task.join_steps)
    assert decode_budget(direct, [short, long]) == 2 + DECODE_MARGIN


def test_set_dropout_leaves_lora_dropout_alone():
    model, tok, _ = setup("llama")
    model = _with_lora(model, {"r": 4, "lora_dropout": 0.05}, (0, 1, 2))
    set_dropout(model, 0.3)
    lora = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert lora and set(lora) == {0.05}
    attention = [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attention and set(attention) == {0.3}


# -- devices ---------------------------------------------------------------------------------------
class MetaModel(torch.nn.Module):
    """A stand-in for a model on an accelerator: its weights live on `meta`, every input must be
    there too (else AssertionError), and its logits come back on the CPU (meta tensors hold no
    values) choosing the tokens of `script`, one per call."""

    def __init__(self, vocab: int, script: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.vocab, self.script, self.calls, self.step = vocab, script, [], 0

    def forward(self, input_ids, cache, use_cache, position_ids=None, attention_mask=None, logits_to_keep=0):
        for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("mask", attention_mask)):
            assert t is None or t.device.type == "meta", (
                f"{name} built on {t.device}, not on the model's device"
            )
        self.calls.append((tuple(input_ids.shape), logits_to_keep))
        self.step = 0 if logits_to_keep == 1 else self.step + 1  # a prefill starts the script again
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, self.script[min(self.step, len(self.script) - 1)]] = 1
        return SimpleNamespace(logits=logits)


def test_decoding_and_evaluation_build_every_input_on_the_model_device():
    task = get_task("modchain", **OPTIONS)
    spec = MemorySpec(method="rim", K=2, M=1, task="modchain")
    examples = task.generate(5, seed=0)
    texts = [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]
    tok = build_word_tokenizer(texts + [str(d) for d in range(10)], spec)
    answer = tok.encode(examples[0].answer, add_special_tokens=False)
    model = MetaModel(len(tok), answer + [tok.eos_token_id])
    builder = SequenceBuilder(tok, spec, task.join_steps)
    decoded = greedy_decode(
        model,
        [builder.prompt(ex) for ex in examples],
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=8,
    )
    assert decoded.tokens == [answer] * 5 and decoded.forward_passes == len(answer) + 1
    # One prefill with logits at its last position only, then one token per step.
    assert model.calls[0][1] == 1 and all(shape == (5, 1) for shape, _ in model.calls[1:])

    model.calls.clear()
    metrics, predictions = evaluate(
        model, tok, spec, examples, batch_size=2, latency_examples=1, max_new_tokens=8
    )
    assert [p["prediction"] for p in predictions] == [examples[0].answer] * 5
    assert metrics["n_eval"] == 5 and model.calls
