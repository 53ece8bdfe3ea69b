"""Benchmark: activation patching over every memory-block cell, exact and by attribution, against
TransformerLens.

    python bench/patching.py [--run runs/demo/rim] [--pairs 32] [--deep 12] [--scaling]

Every method patches the clean residual stream (`resid_pre`, layers 0..L-1) into the corrupted run
at every memory-block position, one cell per (layer, block, slot), on the same clean/corrupt
pairs, and scores the logit difference clean token - corrupt token at the last position.

- exact: `Lab.patch(per_slot=True)` (method `exact`, hf backend): a row patched at layer l and
  position p resumes the kept corrupt run from resid[l] at positions p.. and reuses its keys and
  values before p (`engine.resume_sweep`).
- full: the same numbers with every row a whole forward pass (method `full`).
- TransformerLens, batched over pairs: `transformer_lens.patching.get_act_patch_resid_pre` with
  `index_df` holding only the block positions, one forward pass per cell and length group of
  pairs (its own batch axis; a TransformerLens batch must be unpadded). The bridge gets the RiM
  attention mask and position ids (a question-blind readout is not a plain causal run).
- attribution: `Lab.patch(per_slot=True, method="attribution")`: two forward passes and one
  backward through the TransformerBridge for all cells and pairs, with the block-to-block edges
  and AtP*'s QK fix; also timed plain (no QK fix, `attribution_plain`).
  Its agreement with exact patching is Spearman's rank correlation over cells
  (`attribution.agreement`), leaving out cells where both give exactly no change (layer 0: a
  block's state is its token embedding, the same in both runs).

Each method's time includes its own clean states and baselines; the TransformerBridge is booted
before timing (its boot time is reported). Methods are timed interleaved, `--repeat` times, and
the fastest of each counts (a shared machine adds only delay). `--deep L` times exact vs
TransformerLens on an untrained copy of the run's model with L layers (speed does not depend on
the weights). `--scaling` times exact, full and TransformerLens over layers, blocks and pairs on
untrained copies, to show how each cost grows.

Writes bench/results/patching.json (keys `exact_vs_tl_batched_speedup`,
`attribution_speedup_vs_exact`, `attribution_spearman`, ...) and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo/rim", help="RiM run directory (default: runs/demo/rim)")
    p.add_argument("--pairs", type=int, default=32, help="clean/corrupt pairs (default: 32)")
    p.add_argument("--max-rows", type=int, default=256, help="rows per forward pass (default: 256)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more oversubscribe)",
    )
    p.add_argument("--repeat", type=int, default=2, help="timed repeats, interleaved (default: 2)")
    p.add_argument("--deep", type=int, default=12, help="layers of the deep untrained copy (0: skip)")
    p.add_argument("--scaling", action="store_true", help="also time the growth with layers, blocks, pairs")
    p.add_argument(
        "--small-pairs", type=int, default=8, help="pairs on untrained copies, unless varied (default 8)"
    )
    p.add_argument("--out", default=str(HERE / "results" / "patching.json"))
    return p.parse_args(argv)


def tl_sweep(bridge, builder, pairs, cells):
    """get_act_patch_resid_pre at the block positions for `pairs` (one batch of equal-length
    prompts): per-pair metric [cells, pairs]."""
    import pandas as pd
    import torch
    from transformer_lens.patching import get_act_patch_resid_pre

    from rim_lens.analysis.attribution import Masked
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
        _, cache = Masked(bridge, clean).run_with_cache(clean.input_ids)
        result = get_act_patch_resid_pre(
            Masked(bridge, corrupt),
            corrupt.input_ids,
            cache,
            metric,
            index_axis_names=None,
            index_df=index_df,
            reduce="none",
        )
    return result.values  # [cells, batch]


class Setup:
    """A session, its pairs, its cells and a TransformerBridge over (a copy of) its model."""

    def __init__(self, lab, n_pairs: int, bridge=None):
        from rim_lens.analysis import attribution, patching
        from rim_lens.analysis.backends import make_backend

        self.lab = lab
        pairs = patching.make_pairs(lab, seed=0)
        self.pairs = pairs.subset(range(min(n_pairs, len(pairs.clean))))
        self.sel = lab.select()
        self.cells = self.sel.sites()
        t = time.perf_counter()
        self.bridge = bridge or make_backend("tl", lab.model, lab.tokenizer, lab.backend.model_dir).bridge
        self.bridge.eval()
        self.boot_s = time.perf_counter() - t
        attribution.bridge_of(lab)  # boots (and keeps) the bridge attribution runs on
        self.groups = defaultdict(list)  # TransformerLens batches must be unpadded: group by length
        for i, (ex, prefix) in enumerate(zip(self.pairs.corrupt, self.pairs.prefix)):
            self.groups[len(lab.builder.prompt(ex)) + len(prefix)].append(i)

    def warm_up(self) -> None:
        """Every method once on one pair: first calls allocate and import."""
        one = Setup(self.lab, 1, self.bridge)
        for method in ("exact", "full", "attribution"):
            one.patch(method)
        one.tl_batched()

    @property
    def n(self) -> int:
        return len(self.pairs.clean)

    def patch(self, method: str, max_rows: int = 256):
        from rim_lens.analysis import patching

        return patching.patch(
            self.lab, self.sel, per_slot=True, pairs=self.pairs, method=method, max_rows=max_rows
        )

    def tl_batched(self):
        import torch

        values = torch.zeros(len(self.cells), self.n, dtype=torch.float64)
        for rows in self.groups.values():
            values[:, rows] = tl_sweep(
                self.bridge, self.lab.builder, self.pairs.subset(rows), self.cells
            ).double()
        return values

    def tl_passes(self) -> int:
        return len(self.cells) * len(self.groups) + len(self.groups)


def timed(methods: dict, repeat: int) -> tuple[dict, dict]:
    """Each method run `repeat` times, interleaved; (fastest seconds, last output) per method."""
    times, outputs = defaultdict(list), {}
    for _ in range(repeat):
        for name, fn in methods.items():
            t = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}, outputs


def untrained_copy(lab, layers: int | None = None, K: int | None = None, seed: int = 0):
    """The run's architecture, width, tokenizer and memory spec with `layers` layers and `K` blocks,
    randomly initialised, saved to a temporary checkpoint (TransformerLens boots from it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rim_lens.analysis.lab import Lab
    from rim_lens.model.checkpoints import save_checkpoint

    config = lab.model.config.__class__.from_dict(lab.model.config.to_dict())
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = lab.spec.replace(K=K or lab.spec.K)
    path = save_checkpoint(
        model, lab.tokenizer, spec, Path(tempfile.mkdtemp(prefix="rim-patch-bench-")) / "model"
    )
    return Lab.from_model(model, lab.tokenizer, spec, lab.examples, task=lab.task, model_dir=path)


def exact_vs_tl(setup: Setup, repeat: int, max_rows: int, full: bool = False) -> dict:
    """Seconds of exact (and full) patching and TransformerLens batched on one setup, interleaved."""
    import torch

    methods = {"exact": lambda: setup.patch("exact", max_rows), "tl_batched": setup.tl_batched}
    if full:
        methods["full"] = lambda: setup.patch("full", max_rows)
    seconds, out = timed(methods, repeat)
    exact = torch.tensor(out["exact"].patched)
    row = {
        "layers": setup.lab.backend.n_layers,
        "K": setup.lab.spec.K,
        "prompt_tokens": int(max(setup.groups)),
        "pairs": setup.n,
        "cells": len(setup.cells),
        **{f"{k}_s": v for k, v in seconds.items()},
        "exact_vs_tl_batched_speedup": seconds["tl_batched"] / seconds["exact"],
        "max_abs_diff_exact_vs_tl": float((exact - out["tl_batched"]).abs().max()),
    }
    if full:
        row["exact_vs_full_speedup"] = seconds["full"] / seconds["exact"]
    return row


def on_copy(lab, args, layers: int | None = None, K: int | None = None, pairs: int | None = None) -> dict:
    """Exact vs TransformerLens, one timed run each, on an untrained copy of the run's model."""
    setup = Setup(untrained_copy(lab, layers=layers, K=K), pairs or args.small_pairs)
    setup.warm_up()
    return exact_vs_tl(setup, 1, args.max_rows)


def scaling(lab, args, deep: dict | None) -> list[dict]:
    """Exact and TransformerLens on untrained copies of the run's model, one axis varied at a
    time from the run's own (layers, K, `--small-pairs` pairs): layers, blocks (prompt length),
    pairs. The deep copy's measurement stands for its number of layers."""
    n_layers, K = lab.backend.n_layers, lab.spec.K
    grid = [("layers", dict(layers=n)) for n in sorted({2, n_layers, 8} - {args.deep})]
    grid += [("K", dict(K=k)) for k in sorted({2, K, 16})]
    grid += [("pairs", dict(pairs=n)) for n in (4, 16, 32)]
    rows = [{"varied": "layers", **deep}] if deep else []
    print("how the cost grows (untrained copies, one run each):")
    for varied, g in grid:
        rows.append({"varied": varied, **on_copy(lab, args, **g)})
    rows.sort(key=lambda r: (["layers", "K", "pairs"].index(r["varied"]), r["layers"], r["K"], r["pairs"]))
    for row in rows:
        print(
            f"  {row['varied']:6s} layers {row['layers']:2d} K {row['K']:2d} "
            f"tokens {row['prompt_tokens']:3d} pairs {row['pairs']:3d} cells {row['cells']:4d}: "
            f"exact {row['exact_s']:6.2f}s TL {row['tl_batched_s']:6.2f}s "
            f"(exact {row['exact_vs_tl_batched_speedup']:.1f}x faster)"
        )
    return rows


def write_scaling(rows: list[dict], path: Path) -> None:
    from rim_lens.fileio import atomic_write_text

    head = (
        "| varied | layers | blocks K | prompt tokens | pairs | cells | exact s | TL batched s | TL / exact |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['varied']} | {r['layers']} | {r['K']} | {r['prompt_tokens']} | {r['pairs']} "
            f"| {r['cells']} | "
            f"{r['exact_s']:.2f} | {r['tl_batched_s']:.2f} | "
            f"{r['exact_vs_tl_batched_speedup']:.1f}x |"
        )
    text = "Patching cost, `python bench/patching.py --scaling` (untrained copies of the run's model).\n\n"
    print(f"written {atomic_write_text(path, text + chr(10).join(lines) + chr(10))}")


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

    from rim_lens.analysis import attribution
    from rim_lens.analysis.lab import Lab
    from rim_lens.fileio import atomic_write_json

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    lab = Lab.open(run, n=None)
    setup = Setup(lab, args.pairs)
    setup.warm_up()

    methods = {
        "exact": lambda: setup.patch("exact", args.max_rows),
        "full": lambda: setup.patch("full", args.max_rows),
        "attribution": lambda: setup.patch("attribution"),
        "attribution_plain": lambda: attribution.attribution_patch(
            lab, setup.sel, per_slot=True, pairs=setup.pairs, qk_fix=False
        ),
        "tl_batched": setup.tl_batched,
    }
    seconds, out = timed(methods, args.repeat)
    exact, estimate = out["exact"], out["attribution"]
    tl = out["tl_batched"]
    agreement = attribution.agreement(exact, estimate)
    agreement_plain = attribution.agreement(exact, out["attribution_plain"])
    rows_total = (len(setup.cells) + 1) * setup.n
    passes = {
        "exact": f"1 kept + {-(-rows_total // args.max_rows)}+ resumed (partial)",
        "full": -(-rows_total // args.max_rows),
        "attribution": "2 forward + 1 backward",
        "attribution_plain": "2 forward + 1 backward",
        "tl_batched": setup.tl_passes(),
    }
    cfg = lab.model.config
    summary = {
        "run": str(run),
        "model": f"{cfg.model_type}, {cfg.num_hidden_layers} layers, width {cfg.hidden_size}",
        "task": lab.task.name,
        "K": lab.spec.K,
        "M": lab.spec.M,
        "readout_sees_question": lab.spec.readout_sees_question,
        "pairs": setup.n,
        "cells": len(setup.cells),
        "length_groups": len(setup.groups),
        "seconds": seconds,
        "forward_passes": passes,
        "exact_vs_tl_batched_speedup": seconds["tl_batched"] / seconds["exact"],
        "exact_vs_full_speedup": seconds["full"] / seconds["exact"],
        "attribution_speedup_vs_exact": seconds["exact"] / seconds["attribution"],
        "attribution_speedup_vs_full": seconds["full"] / seconds["attribution"],
        "attribution_speedup_vs_tl_batched": seconds["tl_batched"] / seconds["attribution"],
        "attribution_spearman": agreement.value,
        "attribution_spearman_interval": agreement.to_dict(),
        "attribution_plain_spearman_interval": agreement_plain.to_dict(),
        "max_abs_diff_exact_vs_tl": float((torch.tensor(exact.patched) - tl).abs().max()),
        "max_abs_diff_exact_vs_full": float(abs(exact.patched - out["full"].patched).max()),
        "edges": estimate.summary["edges"],
        "metric_range": [float(exact.patched.mean(1).min()), float(exact.patched.mean(1).max())],
        "tl_boot_seconds": setup.boot_s,
        "repeat": args.repeat,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(
        f"Patching every block cell of {summary['model']} ({run}): {setup.n} pairs x "
        f"{len(setup.cells)} cells (layers 0..{setup.sel.layers[-1]} x {len(setup.sel.blocks)} blocks x "
        f"{len(setup.sel.slots)} slots), "
        f"{torch.get_num_threads()} threads, load average {load_start:.1f} at the start (a shared machine)"
    )
    print(f"{'method':34s} {'seconds':>8s} {'vs exact':>9s}  forward passes")
    for name, label in (
        ("exact", "exact (skips unchanged work)"),
        ("full", "full (every row a whole pass)"),
        ("tl_batched", "TransformerLens, batched over pairs"),
        ("attribution", "attribution patching (AtP*)"),
        ("attribution_plain", "attribution, plain (no QK fix)"),
    ):
        print(f"{label:34s} {seconds[name]:8.3f} {seconds[name] / seconds['exact']:8.2f}x  {passes[name]}")
    print(
        f"exact vs TransformerLens: {summary['exact_vs_tl_batched_speedup']:.1f}x faster, max |diff| "
        f"{summary['max_abs_diff_exact_vs_tl']:.1e}; vs full: {summary['exact_vs_full_speedup']:.1f}x, "
        "max |diff| "
        f"{summary['max_abs_diff_exact_vs_full']:.1e}"
    )
    print(
        f"attribution: {summary['attribution_speedup_vs_exact']:.1f}x faster than exact, "
        f"{summary['attribution_speedup_vs_full']:.1f}x than full; Spearman with exact over cells: "
        f"{agreement}"
    )
    print(f"plain attribution (no QK fix): Spearman {agreement_plain}")
    print(f"edges: {summary['edges']}")

    deep = None
    if args.deep:
        summary["deep"] = deep = on_copy(lab, args, layers=args.deep)
        print(
            f"untrained copy with {args.deep} layers, {deep['pairs']} pairs x {deep['cells']} cells: exact "
            f"{deep['exact_s']:.2f}s, TransformerLens {deep['tl_batched_s']:.2f}s: exact "
            f"{deep['exact_vs_tl_batched_speedup']:.1f}x faster "
            f"(max |diff| {deep['max_abs_diff_exact_vs_tl']:.1e})"
        )
    if args.scaling:
        summary["scaling"] = scaling(lab, args, deep)
        write_scaling(summary["scaling"], Path(args.out).with_name("patching_scaling.md"))
    summary["load_average_1min_start_end"] = [load_start, os.getloadavg()[0]]
    print(f"written {atomic_write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
