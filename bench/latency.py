"""Inference cost of the demo runs side by side: time to first answer token (TTFT) and full-answer
latency at batch 1 with a KV cache, in ONE interleaved measurement.

    python bench/latency.py [--runs runs/demo] [--n 50] [--threads 1]

Measures every run under --runs that exists among direct, cot, pause, rim and coconut (direct, cot
and rim are required) with `rim_lens.compare.latency_side_by_side`: the same held-out examples,
the runs taking turns per example in a rotating order, untimed warm-up answers first, each
example's fastest of `--repeats` tries, medians over examples with interquartile ranges. Each
run decodes as its method does: RiM whose readout sees the question takes the plain causal path
(no mask at all at batch 1), a question-blind RiM keeps the role mask, CoT writes its steps.
Reported: RiM / direct for TTFT and full latency (goal <= 1.05; paper: 126.5 / 126.0 ms), CoT / RiM
full latency (paper, Llama-3.2-1B on GSM8K: 8.8x) and, if a coconut run exists, Coconut / RiM
(paper: 2.4x).

Writes bench/results/latency.json (or --out). Absolute times depend on the machine and its load;
the ratios within one measurement are the result.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REQUIRED = ("direct", "cot", "rim")
OPTIONAL = ("pause", "coconut")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency.json"
PAPER = {
    "rim_over_direct_latency": 126.5 / 126.0,
    "cot_over_rim_latency": 8.8,
    "coconut_over_rim_latency": 2.4,
}


def is_run(path: Path) -> bool:
    from rim_lens import artefacts

    return all(
        p.exists()
        for p in (path / artefacts.MODEL / "config.json", artefacts.split_path(path), path / artefacts.CONFIG)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default="runs/demo", help="folder holding the demo runs (default: runs/demo)"
    )
    parser.add_argument("--n", type=int, default=50, help="held-out examples to time (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed answers per run first (default 3)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="tries per example and run, fastest counts (5)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument("--max-new-tokens", type=int, help="decoding limit (default: each run's recipe)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    root = Path(args.runs)
    missing = [m for m in REQUIRED if not is_run(root / m)]
    if missing:
        print(
            f"bench/latency.py: no trained {', '.join(missing)} run(s) in {root}; run `make demo` first "
            "(or pass --runs DIR)",
            file=sys.stderr,
        )
        return 2
    if args.n < 1:
        print("bench/latency.py: --n must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from rim_lens.compare import latency_side_by_side
    from rim_lens.errors import RimLensError
    from rim_lens.fileio import atomic_write_json

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    names = list(REQUIRED) + [m for m in OPTIONAL if is_run(root / m)]
    start = time.perf_counter()
    try:
        measured = latency_side_by_side(
            {name: root / name for name in names},
            n=args.n,
            warmup=args.warmup,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
        )
    except RimLensError as err:
        print(f"bench/latency.py: {err}", file=sys.stderr)
        return 2
    runs = measured["runs"]
    base, rim = runs["direct"], runs["rim"]
    ratios = {
        "rim_over_direct_ttft": rim["ttft_ms"] / base["ttft_ms"],
        "rim_over_direct_latency": rim["latency_ms"] / base["latency_ms"],
        "cot_over_rim_ttft": runs["cot"]["ttft_ms"] / rim["ttft_ms"],
        "cot_over_rim_latency": runs["cot"]["latency_ms"] / rim["latency_ms"],
    }
    if "coconut" in runs:  # its prefill is one pass per continuous thought, plus one
        ratios["coconut_over_rim_ttft"] = runs["coconut"]["ttft_ms"] / rim["ttft_ms"]
        ratios["coconut_over_rim_latency"] = runs["coconut"]["latency_ms"] / rim["latency_ms"]
        ratios["coconut_over_rim_forward_passes"] = runs["coconut"]["forward_passes"] / rim["forward_passes"]

    print(
        f"Latency at batch 1, KV cache, {len(measured['examples'])} held-out examples, {args.threads} "
        f"thread(s), interleaved, medians [IQR] ({time.perf_counter() - start:.0f} s; load average "
        f"{measured['load_average'][0]:.1f} -> {measured['load_average'][1]:.1f}: a shared machine)"
    )
    print(f"{'run':<8} {'TTFT ms':>22} {'latency ms':>22} {'answer tokens':>14} {'passes':>7}")
    for name, r in runs.items():
        ttft = f"{r['ttft_ms']:.2f} [{r['ttft_iqr_ms'][0]:.2f}, {r['ttft_iqr_ms'][1]:.2f}]"
        lat = f"{r['latency_ms']:.2f} [{r['latency_iqr_ms'][0]:.2f}, {r['latency_iqr_ms'][1]:.2f}]"
        print(f"{name:<8} {ttft:>22} {lat:>22} {r['answer_tokens']:>14.1f} {r['forward_passes']:>7.1f}")
    for key, value in ratios.items():
        paper = f" (paper {PAPER[key]:.2f})" if key in PAPER else ""
        print(f"{key}: {value:.2f}{paper}")

    from rim_lens.analysis.lab import Lab

    rim_spec = Lab.open(root / "rim", n=1).spec
    result = {
        "runs": str(root),
        **measured,
        "ratios": ratios,
        "paper": PAPER,
        "rim": {"K": rim_spec.K, "M": rim_spec.M, "readout_sees_question": rim_spec.readout_sees_question},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"written {atomic_write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
