"""Benchmark: streamed capture of memory-block states vs caching everything in memory.

    python bench/capture.py [--run runs/demo/rim] [--n 10000]

- streamed: `Lab.capture` (hf backend): block states at every layer, written to
  safetensors shards of 1,024 examples; it also decodes the readout after every block (K greedy
  decodes per example), which the naive approach does not do.
- naive: `TransformerBridge.run_with_cache` on every batch, keeping every cache (every hook's
  activation at every position) for every example in memory.

Each approach runs in its own subprocess, after one warm-up batch, so its peak memory is its own: the
peak resident set size is sampled every 5 ms during the measured phase, minus
the RSS just before it (model loaded, examples built; getrusage's lifetime peak is recorded as a
cross-check). If the naive approach would exceed
`--naive-limit-gb`, it stops early and its memory is extrapolated linearly to n examples
(reported as such). Prints a side-by-side table with ratios and writes bench/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo/rim", help="RiM run directory (default: runs/demo/rim)")
    p.add_argument("--n", type=int, default=10_000, help="examples (default: 10,000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--naive-limit-gb",
        type=float,
        default=4.0,
        help="stop the naive approach before its caches pass this much memory, and extrapolate (default: 4)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in each worker (default: torch's choice)"
    )
    p.add_argument("--out", default=str(HERE / "results" / "capture.json"))
    p.add_argument("--worker", choices=("streamed", "naive"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- memory ----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread while the block runs."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# -- workers ---------------------------------------------------------------------------------------
def load(run: Path, n: int, out: Path):
    """A session over the run's model with n examples (its test examples, then generated ones,
    repeated if the task has fewer distinct questions than n), capturing into `out`."""
    from dataclasses import replace

    from rim_lens.analysis.lab import Lab

    lab = Lab.open(run, n=None)
    examples = list(lab.examples)
    if len(examples) < n:
        try:
            examples += lab.task.generate(
                n - len(examples), seed=99, exclude={ex.question for ex in examples}
            )
        except Exception:  # noqa: BLE001 - a small question space: repeat what there is
            pass
    base = list(examples)
    examples = [
        replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i // len(base)}") for i in range(n)
    ]
    return Lab.from_model(lab.model, lab.tokenizer, lab.spec, examples, task=lab.task, out=out)


def worker(args) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(tempfile.mkdtemp(prefix="rim-capture-bench-"))
    lab = load(run, args.n, out)
    result = {"approach": args.worker, "threads": torch.get_num_threads()}
    if args.worker == "streamed":
        try:
            lab.with_examples(lab.examples[: args.batch_size]).capture(refresh=True)  # warm-up
            with PeakRSS() as mem:
                t = time.perf_counter()
                store = lab.capture(batch_size=args.batch_size, refresh=True).store
                seconds = time.perf_counter() - t
            capture_dir = out / "capture"
            result.update(
                n=store.n,
                seconds=seconds,
                stored_bytes=sum(p.stat().st_size for p in capture_dir.iterdir()),
                shards=len(store.meta["shards"]),
                layers=len(store.layers),
            )
            # The same capture without decoding the readouts: what collecting and writing the
            # block states alone costs.
            with PeakRSS() as mem_states:
                t = time.perf_counter()
                lab.capture(batch_size=args.batch_size, readouts=False, refresh=True)
                result["states_only_seconds"] = time.perf_counter() - t
            # Same process, after the full capture: the allocator reuses its memory, so this
            # peak is not comparable with the others (kept for the record only).
            result["states_only_peak_delta_mb"] = (mem_states.peak - mem_states.start) / MB
        finally:
            shutil.rmtree(out, ignore_errors=True)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        shutil.rmtree(out, ignore_errors=True)
        bridge = TransformerBridge.boot_transformers(
            str(run / "model"), hf_model=lab.model, tokenizer=lab.tokenizer, device="cpu"
        )
        bridge.eval()
        builder, examples = lab.builder, lab.examples
        limit = args.naive_limit_gb * 1024**3
        caches, held, done = [], 0, 0
        with torch.no_grad():  # warm-up, not kept
            warm = builder.collate([builder.prompt(ex) for ex in examples[: args.batch_size]], side="left")
            bridge.run_with_cache(
                warm.input_ids, attention_mask=warm.attention_mask, position_ids=warm.position_ids
            )
            del warm
        with PeakRSS() as mem, torch.no_grad():
            t = time.perf_counter()
            for start in range(0, len(examples), args.batch_size):
                chunk = examples[start : start + args.batch_size]
                batch = builder.collate([builder.prompt(ex) for ex in chunk], side="left")
                logits, cache = bridge.run_with_cache(
                    batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
                )
                caches.append((logits, cache))
                # Hook aliases share storage (e.g. one layer's resid_post is the next one's
                # resid_pre): count every storage once.
                storages = {
                    t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [logits, *cache.values()]
                }
                held += sum(storages.values())
                done += len(chunk)
                # Stop before the next batch would pass the limit (projected from what is held).
                if held * (done + args.batch_size) / done > limit and done < len(examples):
                    break
            seconds = time.perf_counter() - t
        result.update(
            n=done,
            seconds=seconds,
            stored_bytes=held,
            hooks=len(caches[0][1]),
            stopped_early=done < len(examples),
        )
    # getrusage's peak covers the whole process (model loading too): a cross-check, not the measure.
    result.update(
        rss_before_mb=mem.start / MB,
        peak_rss_mb=mem.peak / MB,
        peak_delta_mb=(mem.peak - mem.start) / MB,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        examples_per_s=result["n"] / result["seconds"],
    )
    return result


# -- driver ----------------------------------------------------------------------------------------
def run_worker(args, approach: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        approach,
        "--run",
        args.run,
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--naive-limit-gb",
        str(args.naive_limit_gb),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench/capture.py: the {approach} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    run = Path(args.run)
    if not (run / "model").exists():
        print(
            f"bench/capture.py: error: no trained run at {run}; run `make demo` first (or pass --run DIR)",
            file=sys.stderr,
        )
        return 2
    load_start = os.getloadavg()[0]
    streamed = run_worker(args, "streamed")
    naive = run_worker(args, "naive")
    load_end = os.getloadavg()[0]
    # Memory to hold all n examples' caches: measured, or extrapolated linearly when stopped early.
    scale = args.n / naive["n"]
    naive_full = {
        "peak_delta_mb": naive["peak_delta_mb"] * scale,
        "stored_bytes": naive["stored_bytes"] * scale,
        "seconds": naive["seconds"] * scale,
    }
    states_rate = streamed["n"] / streamed["states_only_seconds"]
    rows = [
        (
            "examples",
            f"{streamed['n']:,}",
            f"{naive['n']:,}" + (" (stopped: memory limit)" if naive["stopped_early"] else ""),
            "",
        ),
        (
            "examples / s",
            f"{streamed['examples_per_s']:.0f}",
            f"{naive['examples_per_s']:.0f}",
            f"{naive['examples_per_s'] / streamed['examples_per_s']:.2f}x",
        ),
        (
            "examples / s, readouts not decoded",
            f"{states_rate:.0f}",
            f"{naive['examples_per_s']:.0f}",
            f"{naive['examples_per_s'] / states_rate:.2f}x",
        ),
        (
            f"seconds for {args.n:,}",
            f"{streamed['seconds']:.1f}",
            f"{naive_full['seconds']:.1f}" + (" (extrapolated)" if scale > 1 else ""),
            f"{naive_full['seconds'] / streamed['seconds']:.2f}x",
        ),
        (
            f"peak RSS increase, MB, for {args.n:,}",
            f"{streamed['peak_delta_mb']:.0f}",
            f"{naive_full['peak_delta_mb']:.0f}" + (" (extrapolated)" if scale > 1 else ""),
            f"{naive_full['peak_delta_mb'] / max(streamed['peak_delta_mb'], 1):.0f}x",
        ),
        (
            f"activations kept, MB, for {args.n:,}",
            f"{streamed['stored_bytes'] / MB:.0f} (on disk)",
            f"{naive_full['stored_bytes'] / MB:.0f} (in memory)" + (" (extrapolated)" if scale > 1 else ""),
            f"{naive_full['stored_bytes'] / streamed['stored_bytes']:.0f}x",
        ),
    ]
    print(
        f"Capture of {args.n:,} examples, model {run} (batch {args.batch_size}, {streamed['threads']} "
        "threads, "
        f"load average {load_start:.1f} -> {load_end:.1f})"
    )
    widths = [
        max(len(r[i]) for r in rows + [("", "streamed capture", "naive run_with_cache", "naive / streamed")])
        for i in range(4)
    ]
    for r in [("", "streamed capture", "naive run_with_cache", "naive / streamed")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(
        "- streamed: block states at every layer to safetensors shards, plus the readout after every block "
        "(K greedy decodes);"
    )
    print(
        f"  'readouts not decoded': the same capture with readouts=False, run after it in the same "
        f"process ({streamed['states_only_seconds']:.1f} s)."
    )
    print(
        f"- naive: every hook of the TransformerBridge ({naive['hooks']} per batch) at every position, all "
        "kept in memory."
    )
    if scale > 1:
        print(
            f"- the naive run stopped at {naive['n']:,} examples to stay under {args.naive_limit_gb} GB; "
            "its time and memory for all examples are extrapolated linearly."
        )
    summary = {
        "run": str(run),
        "n": args.n,
        "batch_size": args.batch_size,
        "streamed": streamed,
        "naive": naive,
        "naive_extrapolated_to_n": naive_full if scale > 1 else None,
        "streamed_examples_per_s_readouts_not_decoded": states_rate,
        "ratios": {
            "throughput_naive_over_streamed": naive["examples_per_s"] / streamed["examples_per_s"],
            "throughput_naive_over_streamed_readouts_not_decoded": naive["examples_per_s"] / states_rate,
            "peak_memory_naive_over_streamed": naive_full["peak_delta_mb"]
            / max(streamed["peak_delta_mb"], 1),
            "kept_bytes_naive_over_streamed": naive_full["stored_bytes"] / streamed["stored_bytes"],
        },
        "load_average_1min_start_end": [load_start, load_end],
        "python": platform.python_version(),
    }
    from rim_lens.fileio import atomic_write_json

    print(f"written {atomic_write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
