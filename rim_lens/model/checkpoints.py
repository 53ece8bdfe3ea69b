"""Model construction, loading and checkpoints.

Every checkpoint is a plain Hugging Face directory (safetensors weights, config, tokenizer)
plus the memory spec, so `AutoModelForCausalLM.from_pretrained(dir)` loads it with nothing
but transformers installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rim_lens.errors import ConfigError, RimLensError, RunError, clip
from rim_lens.fileio import (
    check_safetensors,
    follow_umask,
    read_json,
    recover_dir,
    replace_dir,
    temp_dir,
    writing,
)
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import add_memory_tokens

# (layers, width, heads) for models trained from scratch.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "small": (4, 128, 4),
    "deep": (8, 128, 4),  # small's width at twice the depth: blocks add positions, not layers
    "medium": (6, 192, 6),
    "large": (8, 256, 8),
}
ARCHITECTURES = ("gpt2", "llama")
# Training memory per parameter: fp32 weights, gradients and AdamW's two moments.
TRAIN_BYTES_PER_PARAMETER = 16


def parameter_count(arch: str, preset: str, max_positions: int, vocab: int = 0) -> int:
    """About how many parameters `build_model` makes, without making them: embeddings, GPT-2's
    learned position embeddings (Llama's rotary positions have none) and the layers."""
    layers, width, _ = PRESETS[preset]
    per_layer = (12 if arch == "gpt2" else 16) * width**2  # attention 4 d^2, MLP 8 d^2 (Llama 12 d^2)
    positions = max_positions * width if arch == "gpt2" else 0
    return vocab * width + positions + layers * per_layer


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
    """A local (or hub) HF causal LM with the memory tokens added and embeddings resized.

    Anything that looks like a path is never sent to the hub; a hub id is looked up in the local
    cache only when the hub is offline (HF_HUB_OFFLINE) or cannot be reached, so that fails at
    once instead of after the hub client's retries."""
    local = Path(path).expanduser()
    fix = "model.pretrained must be a Hugging Face model directory (config.json, weights, tokenizer)"
    if local.is_dir():
        _check_model_dir(local, ConfigError, fix)
    elif looks_like_path(str(path)):
        raise ConfigError(
            f"model.pretrained: {clip(str(path))}: no such directory; {fix} (rim-lens model import makes one)"
        )
    offline = None if local.is_dir() else hub_unreachable()
    if trust_remote_code:
        where = f"the directory {local.resolve()}" if local.is_dir() else f"the hub repository {path}"
        print(
            f"rim-lens: warning: model.trust_remote_code is true: Python code from {where} will run "
            "with your permissions; use it only for models you trust",
            file=sys.stderr,
        )
    options = dict(trust_remote_code=trust_remote_code, local_files_only=offline is not None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options)
    except OSError as err:
        # transformers raises OSError both for a missing local directory and an unreachable hub id.
        hub = (
            f"not in the local cache, and the hub is {offline}; give a local model directory"
            if offline
            else f"and not reachable on the hub ({_reason(err)})"
        )
        raise ConfigError(
            f"model.pretrained: cannot load {clip(str(path))!r}: not a local HF model directory, {hub}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged directory fails in many ways inside transformers
        raise ConfigError(
            f"model.pretrained: {clip(str(path))}: cannot load ({_reason(err)}); {fix}"
        ) from None
    if add_memory_tokens(tokenizer, spec):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def looks_like_path(text: str) -> bool:
    """Whether `text` names a local path rather than a hub id: it starts with ".", "/" or "~", or
    it holds a path separator and some folder along it exists here."""
    if text.startswith((".", "/", "~", os.sep)):
        return True
    path = Path(text)
    return ("/" in text or os.sep in text) and any(parent.exists() for parent in list(path.parents)[:-1])


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be asked ("offline (HF_HUB_OFFLINE)", "unreachable (...)"),
    or None if a connection to it opens: one attempt, no retries."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):
        return "offline (HF_HUB_OFFLINE)"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return f"unreachable ({host}: {err.strerror or type(err).__name__})"
    return None


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {clip(lines[0], 120)}" if lines else type(err).__name__


def _check_model_dir(directory: Path, error: type[RimLensError], fix: str) -> None:
    """Error naming the file unless `directory` holds a loadable config, safetensors weights (complete)
    and a tokenizer; transformers would fail on any of these with a traceback, or not at all."""
    config = directory / "config.json"
    if not config.is_file():
        raise error(f"{directory}: no config.json here; {fix}")
    read_json(config, error, fix)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        found = f" (found {', '.join(pickled[:2])}: rim-lens loads safetensors only)" if pickled else ""
        raise error(f"{directory}: no *.safetensors weights{found}; {fix}")
    for path in weights:
        check_safetensors(path, error, fix)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            read_json(directory / name, error, fix)


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
    tmp = temp_dir(directory)
    try:
        with writing(directory):
            write(tmp)
            follow_umask(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(directory)
        raise
    return directory


# Whether this command may run the Python code a checkpoint carries (`--trust-remote-code`).
_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("remote_code", default=False)


@contextlib.contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    """Within the block, `load_checkpoint` runs the code of a checkpoint that carries its own (a
    model trained from one with `model.trust_remote_code`) if `allowed`; never implicitly."""
    token = _REMOTE_CODE.set(allowed)
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def load_checkpoint(directory: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, MemorySpec]:
    """Model (eval mode, fp32, CPU), tokenizer and memory spec of a rim-lens checkpoint."""
    directory = Path(directory)
    recover_dir(directory)
    if not (directory / "config.json").exists():
        raise RunError(f"{directory}: no model here (config.json missing)")
    fix = "train the run again (rim-lens train RECIPE --overwrite)"
    _check_model_dir(directory, RunError, fix)
    spec = MemorySpec.load(directory)
    config = read_json(directory / "config.json", RunError, fix)
    custom = config.get("auto_map") if isinstance(config, dict) else None
    trust = bool(custom) and _REMOTE_CODE.get()
    if custom and not trust:
        files = (
            sorted({str(v).split(".")[0] + ".py" for v in custom.values()})
            if isinstance(custom, dict)
            else []
        )
        raise RunError(
            f"{directory}: the model runs Python code of its own ({clip(', '.join(files), 60)}); pass "
            "--trust-remote-code to load it, only if you trust that code"
        )
    if trust:
        print(
            f"rim-lens: warning: --trust-remote-code: Python code from {directory} runs with your "
            "permissions",
            file=sys.stderr,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint fails in many ways inside transformers
        raise RunError(f"{directory}: cannot load the checkpoint ({_reason(err)}); {fix}") from None
    model.eval()
    return model, tokenizer, spec
