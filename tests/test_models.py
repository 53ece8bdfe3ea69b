"""Checkpoints are plain Hugging Face directories; saving is atomic; a pretrained model is adapted
with LoRA, its vocabulary embeddings frozen and only the memory-token embeddings trained."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tk_models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import rim_lens.model.checkpoints as rim_models
from rim_lens.data.tasks import get_task
from rim_lens.errors import ConfigError, RunError
from rim_lens.model.checkpoints import build_model, load_checkpoint, load_pretrained, save_checkpoint
from rim_lens.model.layouts import SequenceBuilder, collate
from rim_lens.model.memory import SPEC_FILENAME, MemorySpec
from rim_lens.model.tokenizer import _pre_tokenizer, build_word_tokenizer, memory_token_ids
from training import trainer
from training.config import load_config
from training.trainer import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def examples():
    return get_task("modchain", min_length=1, max_length=3).generate(6, seed=0)


@pytest.fixture(scope="module")
def tokenizer(examples):
    return build_word_tokenizer([t for e in examples for t in (e.question, e.answer, *e.steps)], MemorySpec())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@torch.no_grad()
def packed_logits(model, tokenizer, spec, examples):
    builder = SequenceBuilder(tokenizer, spec, get_task("modchain").join_steps)
    batch = collate([builder.grounding(ex) for ex in examples], tokenizer.pad_token_id)
    return model(**batch.model_inputs()).logits


# -- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_loads_with_plain_transformers(tmp_path, tokenizer, examples, arch):
    spec = MemorySpec(K=3)
    model = build_model(tokenizer, arch, "tiny", seed=2).eval()
    save_checkpoint(model, tokenizer, spec, tmp_path / "model")
    assert {"model.safetensors", "config.json", "tokenizer.json", SPEC_FILENAME} <= set(
        snapshot(tmp_path / "model")
    )

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(loaded) is type(model)
    assert torch.equal(
        packed_logits(loaded, tokenizer, spec, examples), packed_logits(model, tokenizer, spec, examples)
    )

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok.encode("<b> <m> </b>", add_special_tokens=False)
    assert ids == list(memory_token_ids(tokenizer, spec)) and len(ids) == 3
    assert tok.convert_ids_to_tokens(ids) == ["<b>", "<m>", "</b>"]
    assert tok.encode(examples[0].question, add_special_tokens=False) == tokenizer.encode(
        examples[0].question, add_special_tokens=False
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )

    m2, tok2, spec2 = load_checkpoint(tmp_path / "model")
    assert spec2 == spec and not m2.training
    assert torch.equal(
        packed_logits(m2, tok2, spec, examples), packed_logits(model, tokenizer, spec, examples)
    )


def test_load_checkpoint_needs_a_memory_spec(tmp_path, tokenizer):
    model = build_model(tokenizer, "gpt2", "tiny")
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(RunError, match="no memory spec"):
        load_checkpoint(tmp_path / "plain")
    with pytest.raises(RunError, match="no model here"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    model.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / SPEC_FILENAME).write_text("{not json")
    with pytest.raises(RunError, match="unreadable memory spec"):
        load_checkpoint(tmp_path / "bad")


def test_save_checkpoint_is_atomic(tmp_path, tokenizer, monkeypatch):
    spec = MemorySpec()
    target = tmp_path / "model"
    save_checkpoint(build_model(tokenizer, "gpt2", "tiny", seed=0), tokenizer, spec, target)
    before = snapshot(target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model(tokenizer, "gpt2", "tiny", seed=1), tokenizer, spec, target)
    assert snapshot(target) == before, "the old checkpoint is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no half-written directory is left"
    monkeypatch.undo()

    # A failure before anything was saved leaves no directory at all.
    monkeypatch.setattr(MemorySpec, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(build_model(tokenizer, "gpt2", "tiny"), tokenizer, spec, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.undo()

    # A successful save replaces the checkpoint whole.
    save_checkpoint(build_model(tokenizer, "gpt2", "tiny", seed=1), tokenizer, spec, target)
    assert snapshot(target)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- a pretrained model, adapted with LoRA -------------------------------------------------------
WORDS = ["<unk>", "</s>", *"0123456789", "pick", "<<", "=", ">>", "####", "the", "a"]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """Stand-in for a local pretrained HF model: a tiny Llama from its config with tied
    embeddings, and a tokenizer that has an end token but neither a begin nor a pad token
    (as many pretrained causal LMs ship)."""
    path = tmp_path_factory.mktemp("pretrained")
    core = Tokenizer(tk_models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = _pre_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tok.bos_token is None and tok.pad_token is None
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("copy")
    lines = []
    for q in random.Random(0).sample(range(1000), 120):
        a, b, c = f"{q:03d}"
        lines.append(f"pick {a} {b} {c}||<<{b}={b}>> #### {b}")
    (root / "train.txt").write_text("\n".join(lines[:100]) + "\n")
    (root / "eval.txt").write_text("\n".join(lines[100:]) + "\n")
    return root / "train.txt", root / "eval.txt"


def lora_config(pretrained_dir, copy_data, **lora):
    train_file, eval_file = copy_data
    return load_config(
        None,
        {
            "method": "rim",
            "task": {"name": "gsm8k"},
            "data": {"train": str(train_file), "val": 20, "test": str(eval_file)},
            "model": {"pretrained": str(pretrained_dir), "lora": lora or {"r": 4, "lora_alpha": 8}},
            "memory": {"K": 2},
            "train": {
                "steps": 8,
                "batch_size": 16,
                "lr": 0.01,
                "stage2_lr": 0.01,
                "threads": 1,
                "log_every": 4,
                "eval_every": 4,
            },
            "eval": {"latency_examples": 1, "n": 8},
        },
    )


@pytest.fixture(scope="module")
def lora_run(pretrained_dir, copy_data, tmp_path_factory):
    """Train through the trainer, recording what was loaded and how (module-wide monkeypatch)."""
    mp = pytest.MonkeyPatch()
    calls: list[tuple[str, dict]] = []
    loaded: dict = {}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs))
            return fn(*args, **kwargs)

        return wrapper

    auto_model = rim_models.AutoModelForCausalLM.from_pretrained
    auto_tok = rim_models.AutoTokenizer.from_pretrained
    mp.setattr(rim_models.AutoModelForCausalLM, "from_pretrained", spy("model", auto_model))
    mp.setattr(rim_models.AutoTokenizer, "from_pretrained", spy("tokenizer", auto_tok))
    original_load = trainer.load_pretrained

    def recording_load(*args, **kwargs):
        model, tok = original_load(*args, **kwargs)
        loaded["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        loaded["tokenizer"] = tok
        return model, tok

    mp.setattr(trainer, "load_pretrained", recording_load)
    try:
        run = train(lora_config(pretrained_dir, copy_data), tmp_path_factory.mktemp("runs") / "lora")
    finally:
        mp.undo()
    return run, calls, loaded


def test_lora_run_saves_a_plain_merged_model(lora_run, pretrained_dir):
    run, _, _ = lora_run
    assert run.status()["status"] == "completed"
    files = set(snapshot(run.model_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json", SPEC_FILENAME} <= files
    assert not any(f.startswith("adapter") for f in files), "LoRA is merged, not saved as an adapter"
    config = json.loads((run.model_dir / "config.json").read_text())
    assert "auto_map" not in config and config["vocab_size"] == len(WORDS) + 3

    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n or "trainable_tokens" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert len(tok.encode("<b> <m> </b>", add_special_tokens=False)) == 3
    # The pretrained tokenizer had no pad (nor bos) token: padding reuses the end token.
    assert tok.pad_token == "</s>" and tok.bos_token is None
    metrics = run.read_json("metrics.json")
    assert metrics["n_eval"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0


def test_lora_trains_memory_embeddings_only_and_the_adapters(lora_run):
    run, _, loaded = lora_run
    before = loaded["params"]
    spec = MemorySpec.load(run.model_dir)
    memory_ids = list(memory_token_ids(loaded["tokenizer"], spec))
    assert memory_ids == [len(WORDS), len(WORDS) + 1, len(WORDS) + 2]
    after = dict(AutoModelForCausalLM.from_pretrained(run.model_dir).named_parameters())

    emb_before, emb_after = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"].detach()
    vocab = torch.arange(len(WORDS))
    assert torch.equal(emb_after[vocab], emb_before[vocab]), "pretrained vocabulary embeddings stay frozen"
    changed = (emb_after[memory_ids] - emb_before[memory_ids]).abs().amax(1)
    assert (changed > 1e-4).all(), "every memory-token embedding was trained"
    # The transformer was adapted (LoRA merged into the linear layers); norms were frozen.
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"].detach(),
        before["model.layers.0.self_attn.q_proj.weight"],
    )
    assert not torch.equal(
        after["model.layers.1.mlp.down_proj.weight"].detach(), before["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(after["model.norm.weight"].detach(), before["model.norm.weight"])


def test_trust_remote_code_is_never_set_implicitly(lora_run):
    _, calls, _ = lora_run
    assert {name for name, _ in calls} == {"model", "tokenizer"}
    assert all(not kwargs.get("trust_remote_code", False) for _, kwargs in calls), calls


def test_lora_bad_option_is_a_config_error(pretrained_dir, copy_data, tmp_path):
    # Checked when the recipe loads, before any model is read or any run directory written.
    with pytest.raises(ConfigError, match="model.lora: unknown LoraConfig field.*alfa"):
        lora_config(pretrained_dir, copy_data, r=4, alfa=8)
    assert not (tmp_path / "bad").exists()


def test_load_pretrained_adds_memory_tokens(pretrained_dir):
    spec = MemorySpec()
    model, tok = load_pretrained(pretrained_dir, spec)
    assert len(tok) == len(WORDS) + 3 == model.get_input_embeddings().weight.shape[0]
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    builder = SequenceBuilder(tok, spec)  # copes without a begin-of-sequence token
    ex = get_task("gsm8k").parse_line("pick 1 2 3||<<2=2>> #### 2")
    seq = builder.grounding(ex)
    assert seq.ids[0] == tok.convert_tokens_to_ids("pick")
    with torch.no_grad():
        out = model(**collate([seq], tok.pad_token_id).model_inputs()).logits
    assert torch.isfinite(out).all()


def test_trust_remote_code_warns_naming_the_directory(pretrained_dir, capsys, no_progress_bars):
    load_pretrained(pretrained_dir, MemorySpec())
    assert capsys.readouterr().err == "", "no warning while remote code stays off"
    load_pretrained(pretrained_dir, MemorySpec(), trust_remote_code=True)
    err = capsys.readouterr().err
    assert err.startswith("rim-lens: warning: model.trust_remote_code is true")
    assert str(pretrained_dir.resolve()) in err and err.count("\n") == 1
