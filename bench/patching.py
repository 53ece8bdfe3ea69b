"""Benchmark: the batched patching sweep against TransformerLens' one-pass-per-cell patching.

    python bench/patching.py [--run runs/demo/rim] [--pairs 32]

Both sides patch the clean residual stream (`resid_pre`, layers 0..L-1) into the corrupted run
at every memory-block position, one cell per (layer, block, slot), on the same clean/corrupt
pairs, and score the logit difference clean token - corrupt token at the last position.

- ours: `Lab.patch(per_slot=True)` (`causal.patch`): many (cell, pair) rows per forward pass (the
  time includes computing the clean states and the clean/corrupt baselines); timed with the
  hf backend and, to separate batching from backend overhead, with the tl backend (the same
  TransformerBridge TransformerLens runs on).
- TransformerLens: `transformer_lens.patching.get_act_patch_resid_pre` with `index_df` holding
  only the block positions (so it does only those cells, no scaling), one forward pass per cell
  (time includes the clean `run_with_cache`). It runs `model.run_with_hooks(tokens)`; the model
  is wrapped so that every call also gets the RiM attention mask and position ids (the demo's
  readout does not see the question, so a plain causal run would be a different computation).
  Two ways: per pair (batch 1: cells x pairs passes, the classic usage) and batched over
  pairs of the same prompt length (TransformerLens' own batch axis: cells x length-groups passes).

Prints a side-by-side table with wall times, speedups and the max |difference| of the per-cell
metric (mean over pairs), and writes bench/results/patching.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo/rim", help="RiM run directory (default: runs/demo/rim)")
    p.add_argument("--pairs", type=int, default=32, help="clean/corrupt pairs (default: 32)")
    p.add_argument("--max-rows", type=int, default=256, help="rows per forward pass in the batched sweep")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--repeat", type=int, default=3, help="timed repeats, interleaved; the best counts (default: 3)"
    )
    p.add_argument("--skip-per-pair", action="store_true", help="skip the slow TransformerLens per-pair mode")
    p.add_argument("--out", default=str(HERE / "results" / "patching.json"))
    return p.parse_args(argv)


class MaskedBridge:
    """A TransformerBridge whose forward calls always get this batch's RiM mask and positions."""

    def __init__(self, bridge, attention_mask, position_ids):
        self._bridge, self._kw = bridge, {"attention_mask": attention_mask, "position_ids": position_ids}

    def __getattr__(self, name):
        return getattr(self._bridge, name)

    def run_with_hooks(self, tokens, fwd_hooks=(), **kwargs):
        return self._bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **self._kw, **kwargs)

    def run_with_cache(self, tokens, **kwargs):
        return self._bridge.run_with_cache(tokens, **self._kw, **kwargs)


def tl_sweep(bridge, builder, pairs, cells):
    """get_act_patch_resid_pre on the block positions for `pairs` (one batch of equal-length
    prompts): per-example metric [cells, pairs]."""
    import pandas as pd
    import torch
    from transformer_lens.patching import get_act_patch_resid_pre

    from rim_lens.analysis.sites import block_index
    from rim_lens.model.layouts import block_positions

    clean = builder.collate(pairs.prompts(builder, "clean"))
    corrupt = builder.collate(pairs.prompts(builder, "corrupt"))
    assert (corrupt.roles > 0).all(), "a TransformerLens batch must be unpadded"
    pos = block_positions(corrupt)[0]
    index_df = pd.DataFrame([(l, int(pos[block_index(k), j])) for l, k, j in cells], columns=["layer", "pos"])
    ct, xt = pairs.clean_token, pairs.corrupt_token
    r = torch.arange(len(pairs.clean))

    def metric(logits):
        return logits[r, -1, ct] - logits[r, -1, xt]

    with torch.no_grad():
        _, cache = MaskedBridge(bridge, clean.attention_mask, clean.position_ids).run_with_cache(
            clean.input_ids
        )
        result = get_act_patch_resid_pre(
            MaskedBridge(bridge, corrupt.attention_mask, corrupt.position_ids),
            corrupt.input_ids,
            cache,
            metric,
            index_axis_names=None,
            index_df=index_df,
            reduce="none",
        )
    return result.values  # [cells, batch]


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "model").exists():
        print(
            f"bench/patching.py: error: no trained run at {run}; run `make demo` first (or pass --run DIR)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.analysis import causal
    from rim_lens.analysis.lab import Lab

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    lab = Lab.open(run, n=None)
    pairs = causal.make_pairs(lab, seed=0)
    pairs = pairs.subset(range(min(args.pairs, len(pairs.clean))))
    n = len(pairs.clean)
    sel = lab.select()
    cells = sel.sites()
    t = time.perf_counter()
    tl_lab = lab.with_backend("tl")
    boot_s = time.perf_counter() - t
    bridge = tl_lab.backend.bridge
    bridge.eval()

    groups = defaultdict(list)  # TransformerLens batches must be unpadded: group pairs by length
    for i in range(n):
        groups[len(lab.builder.prompt(pairs.corrupt[i])) + len(pairs.prefix[i])].append(i)

    # Warm-up (first calls allocate and import), then the timed runs.
    one = pairs.subset([0])
    causal.patch(lab, sel, per_slot=True, pairs=one)
    tl_sweep(bridge, lab.builder, one, cells[:2])

    def ours(session):
        table = causal.patch(session, sel, per_slot=True, pairs=pairs, max_rows=args.max_rows).table
        assert [tuple(c) for c in table[["layer", "block", "slot"]].values.tolist()] == cells
        return torch.tensor(table["logit_diff"].values, dtype=torch.float64)

    def tl_batched():
        values = torch.zeros(len(cells), n, dtype=torch.float64)
        for rows in groups.values():
            values[:, rows] = tl_sweep(bridge, lab.builder, pairs.subset(rows), cells).double()
        return values.mean(1)

    def tl_per_pair():
        values = torch.zeros(len(cells), n, dtype=torch.float64)
        for i in range(n):
            values[:, i] = tl_sweep(bridge, lab.builder, pairs.subset([i]), cells)[:, 0].double()
        return values.mean(1)

    methods = {
        "ours (hf backend)": lambda: ours(lab),
        "ours (tl backend)": lambda: ours(tl_lab),
        "TransformerLens, batched over pairs": tl_batched,
    }
    if not args.skip_per_pair:
        methods["TransformerLens, per pair"] = tl_per_pair
    tl_passes = {
        "TransformerLens, batched over pairs": len(cells) * len(groups) + len(groups),
        "TransformerLens, per pair": (len(cells) + 1) * n,
    }
    # Interleaved repeats, best of `repeat`: the machine is shared, so load drifts during a run.
    load_start = os.getloadavg()[0]
    timings, per_cell = defaultdict(list), {}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            t = time.perf_counter()
            per_cell[name] = fn()
            timings[name].append(time.perf_counter() - t)
    timings = {name: min(ts) for name, ts in timings.items()}

    rows_total = (len(cells) + 1) * n
    # clean states (batches of 64), the clean baseline (256 rows a pass), then the patched rows
    ours_passes = -(-n // 64) + -(-n // 256) + -(-rows_total // args.max_rows)
    ref = per_cell["ours (hf backend)"]
    base = timings["ours (hf backend)"]
    results = []
    for name, seconds in timings.items():
        results.append(
            {
                "method": name,
                "seconds": seconds,
                "speedup_of_ours_hf": seconds / base,
                "forward_passes": tl_passes.get(name, ours_passes),
                "max_abs_diff_vs_ours_hf": float((per_cell[name] - ref).abs().max()),
            }
        )
    cfg = lab.model.config
    summary = {
        "run": str(run),
        "model": f"{cfg.model_type} {cfg.num_hidden_layers} layers, width {cfg.hidden_size}",
        "task": lab.task.name,
        "K": lab.spec.K,
        "M": lab.spec.M,
        "readout_sees_question": lab.spec.readout_sees_question,
        "pairs": n,
        "cells": len(cells),
        "length_groups": len(groups),
        "max_rows": args.max_rows,
        "repeat": args.repeat,
        "metric_range": [float(ref.min()), float(ref.max())],
        "load_average_1min_start_end": [load_start, os.getloadavg()[0]],
        "threads": torch.get_num_threads(),
        "tl_boot_seconds": boot_s,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": results,
        "notes": [
            "TransformerLens restricted to the block positions with index_df (no scaling): one forward "
            "pass per cell.",
            "TransformerLens runs get the model's RiM attention mask and position ids via a wrapper around "
            "the bridge.",
            "Per-cell metric: mean over pairs of logit(clean token) - logit(corrupt token) at the last "
            "position.",
            "ours: Lab.patch(per_slot=True); its time includes clean states and both baselines.",
            f"Best of {args.repeat} interleaved repeats; 'vs ours (hf)' is each method's time over ours "
            "(hf backend).",
        ],
    }
    print(
        f"Patching sweep on {summary['model']} ({run}): {n} pairs x {len(cells)} cells "
        f"(layers 0..{sel.layers[-1]} x {len(sel.blocks)} blocks x {len(sel.slots)} slots), "
        f"{torch.get_num_threads()} threads, "
        f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} (a shared machine: other jobs slow "
        "every method)"
    )
    print(f"{'method':38s} {'seconds':>9s} {'passes':>7s} {'vs ours (hf)':>13s} {'max |diff|':>11s}")
    for r in results:
        print(
            f"{r['method']:38s} {r['seconds']:9.3f} {r['forward_passes']:7d} "
            f"{r['speedup_of_ours_hf']:12.1f}x {r['max_abs_diff_vs_ours_hf']:11.2e}"
        )
    print(f"per-cell metric (ours, hf) ranges over [{ref.min():.3f}, {ref.max():.3f}]")
    for note in summary["notes"]:
        print(f"- {note}")
    from rim_lens.fileio import atomic_write_json

    print(f"written {atomic_write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
