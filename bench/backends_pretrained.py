"""Check: the TransformerLens and nnsight backends agree with plain HF hooks on SmolLM2-135M
(llama, grouped-query attention: 9 heads, 3 KV heads), on RiM sequences of GSM8K problems.

    python bench/backends_pretrained.py [--model models/SmolLM2-135M-Instruct] [--n 8]

The imported model gets the memory tokens (as training adds them), is saved as a rim-lens
checkpoint and loaded back, then every backend's `run` captures the residual stream at every
layer and the attention output at a few layers, with and without edits (block states zeroed
at one layer). Reports the largest absolute difference from hf of each output and whether it is
within --tolerance (default 1e-4); writes bench/results/backends_pretrained.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--recipe", default=str(REPO / "training" / "recipes" / "gsm8k_lora.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=8, help="test examples in the batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--out", default=str(HERE / "results" / "backends_pretrained.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.analysis.backends import Edit, make_backend
    from rim_lens.data.tasks import get_task
    from rim_lens.model.checkpoints import load_checkpoint, load_pretrained, save_checkpoint
    from rim_lens.model.layouts import SequenceBuilder, block_positions, collate
    from training.config import load_config
    from training.trainer import load_data

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    task = get_task(cfg.task.name, **cfg.task.options)
    spec = cfg.memory.replace(method="rim", task=task.name)
    examples = load_data(cfg, task).test[: args.n]

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_pretrained(args.model, spec)
        checkpoint = save_checkpoint(model, tok, spec, Path(tmp) / "model")
        del model
        model, tok, spec = load_checkpoint(checkpoint)
        builder = SequenceBuilder(tok, spec, task.join_steps)
        batch = collate([builder.scored(ex) for ex in examples], tok.pad_token_id, spec.readout_sees_question)
        layers = list(range(model.config.num_hidden_layers + 1))
        attn = [0, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 1]
        pos = block_positions(batch)  # [B, K, M + 2]
        rows = torch.arange(len(examples))[:, None].expand(-1, pos.shape[2]).flatten()
        edit_layer = model.config.num_hidden_layers // 2
        edits = [
            Edit(edit_layer, rows, pos[:, k].flatten(), torch.zeros(rows.numel(), model.config.hidden_size))
            for k in (0, pos.shape[1] - 1)
        ]
        # All three wrap one model object. Booting the TransformerBridge can switch the model's
        # attention implementation (recorded below), so every backend is built before any runs:
        # all then compute with the same attention kernel.
        attention = {"loaded": model.config._attn_implementation}
        backends = {name: make_backend(name, model, tok, checkpoint) for name in ("hf", "tl", "nnsight")}
        attention["after_booting_backends"] = model.config._attn_implementation
        outputs, seconds = {}, {}
        for name, backend in backends.items():
            start = time.perf_counter()
            outputs[name] = (
                backend.run(batch, capture=layers, capture_attn=attn),
                backend.run(batch, edits=edits),
            )
            seconds[name] = time.perf_counter() - start
        del backends

    ref, ref_edited = outputs["hf"]
    targets = batch.targets != -100
    changed = (ref_edited.logits - ref.logits)[targets].abs().max().item()
    results = {}
    for name in ("tl", "nnsight"):
        out, edited = outputs[name]
        diffs = {
            "logits": (out.logits - ref.logits).abs().max().item(),
            "resid": max((out.resid[l] - ref.resid[l]).abs().max().item() for l in layers),
            "resid_relative": max(
                ((out.resid[l] - ref.resid[l]).abs().max() / ref.resid[l].abs().max()).item() for l in layers
            ),
            "attn": max((out.attn[l] - ref.attn[l]).abs().max().item() for l in attn),
            "edited_logits": (edited.logits - ref_edited.logits).abs().max().item(),
        }
        results[name] = {"max_abs_diff": diffs, "within_tolerance": max(diffs.values()) <= args.tolerance}
    summary = {
        "model": str(Path(args.model).name),
        "architecture": f"{model.config.model_type}, {model.config.num_attention_heads} heads, "
        f"{model.config.num_key_value_heads} KV heads, {model.config.num_hidden_layers} layers",
        "examples": len(examples),
        "sequence_length": batch.input_ids.shape[1],
        "tolerance": args.tolerance,
        "logit_scale": ref.logits.abs().max().item(),
        "resid_scale": max(ref.resid[l].abs().max().item() for l in layers),
        "attention_implementation": attention,
        "edits_change_readout_logits_by": changed,
        "seconds": seconds,
        "results": results,
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(summary, indent=2) + "\n")
    tmp_out.replace(args.out)
    return 0 if all(r["within_tolerance"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
