"""Model construction, loading and checkpoints.

Every checkpoint is a plain Hugging Face directory (safetensors weights, config, tokenizer)
plus the memory spec, so `AutoModelForCausalLM.from_pretrained(dir)` loads it with nothing
but transformers installed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rim_lens.errors import ConfigError, RunError
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import add_memory_tokens

# (layers, width, heads) for models trained from scratch.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "small": (4, 128, 4),
    "medium": (6, 192, 6),
    "large": (8, 256, 8),
}
ARCHITECTURES = ("gpt2", "llama")


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    arch: str = "gpt2",
    preset: str = "small",
    max_positions: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized by `preset`, with the tokenizer's vocabulary."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    n_layer, width, heads = PRESETS[preset]
    # A small vocabulary config keeps GPT-2's bos/eos = 50256 unless they are set explicitly.
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=width,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **ids,
        )
    else:
        config = LlamaConfig(
            num_hidden_layers=n_layer,
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=4 * width,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            tie_word_embeddings=True,
            **ids,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_pretrained(
    path: str | Path, spec: MemorySpec, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local (or hub) HF causal LM with the memory tokens added and embeddings resized."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    except OSError as err:
        # transformers raises OSError both for a missing local directory and an unreachable hub id.
        raise ConfigError(
            f"model.pretrained: cannot load {str(path)!r}: not a local HF model directory, "
            f"and not reachable on the hub ({str(err).splitlines()[0]})"
        ) from None
    if add_memory_tokens(tokenizer, spec):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability of the model itself (stage 2 uses its own); an adapter's
    dropout (PEFT's `lora_dropout`) is part of the adapter's recipe and is left as configured."""
    for name, module in model.named_modules():
        if "lora_dropout" in name.split("."):
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        # Llama applies attention dropout functionally from this attribute.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
    config = getattr(model, "config", None)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if config is not None and hasattr(config, name):
            setattr(config, name, p)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights: where every input tensor must be built."""
    return next(model.parameters()).device


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: MemorySpec, directory: str | Path
) -> Path:
    """Write model, tokenizer and memory spec atomically: a crash never leaves half a checkpoint."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        spec.save(tmp)

    return write_directory(directory, write)


def write_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh directory with `write(tmp)`, then put it in place of `directory` by renames:
    a crash leaves either the old directory or the new one, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = directory.with_name(f".{directory.name}.old")
    try:
        write(tmp)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.rename(directory)
        raise
    return directory


def load_checkpoint(directory: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, MemorySpec]:
    """Model (eval mode, fp32, CPU), tokenizer and memory spec of a rim-lens checkpoint."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise RunError(f"{directory}: no model here (config.json missing)")
    spec = MemorySpec.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model, tokenizer, spec
