"""The benchmarks drive the trainer's own internals (`bench/pretrained.py` builds a `Loop` and calls
`run_stage`); they run only by hand, so their use of those internals is checked here, on a tiny
untrained Llama standing in for SmolLM2 in the benchmark's own GSM8K + LoRA recipe."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO
from test_howto import tiny_llama


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pretrained_args(tmp_path, reference_data):
    bench = load_bench("pretrained")
    lines = (reference_data / "gsm8k" / "valid.txt").read_text().splitlines()[:50]
    model = tiny_llama(tmp_path / "tiny-llama", lines, K=8, M=2)
    overrides = [
        f"model.pretrained={model}",
        "model.lora.r=4",
        "model.lora.lora_alpha=8",
        "data.val=16",
        "train.batch_size=4",
        "eval.batch_size=4",
    ]
    args = bench.parse_args(["--steps", "2", "--threads", "1", *(x for o in overrides for x in ("--set", o))])
    return bench, args


def test_bench_pretrained_trains_through_run_stage(pretrained_args):
    bench, args = pretrained_args
    found = bench.work_train(args, "after")
    assert found["training_stage"] == "grounding" and found["lora_r"] == 4
    assert len(found["step_s"]) == 2 and found["s_per_step"] > 0 and found["tokens_per_step"] > 0


def test_bench_pretrained_held_out_check_runs(pretrained_args):
    bench, args = pretrained_args
    found = bench.work_held_out(args, "after")
    assert found["examples"] == 16 and found["chunk"] == 4
    assert 0 <= found["readout_accuracy_answer"] <= 1
