"""Your own checkpoint: a bare Hugging Face directory opened with a memory spec, and patching with
your own clean/corrupt pairs on a task the library cannot corrupt (GSM8K)."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import pytest
from fixtures import copy_lines

import rim_lens as rl
from rim_lens.errors import RimLensError

# Pairs in the copy task's GSM8K line format: the answer is the middle digit.
PAIRS = [(f"pick 1 {a} 3||<<{a}={a}>> #### {a}", f"pick 1 {b} 3||<<{b}={b}>> #### {b}") for a, b in
         [(2, 7), (4, 0), (9, 5), (3, 8)]]  # fmt: skip


def bare_copy(model_dir, dest):
    """A run's model/ without rim_memory.json: what a checkpoint trained elsewhere looks like."""
    shutil.copytree(model_dir, dest)
    (dest / "rim_memory.json").unlink()
    return dest


def test_a_foreign_directory_without_a_spec_fails_in_one_line_naming_the_way_out(tiny_runs, tmp_path):
    bare = bare_copy(tiny_runs["rim"] / "model", tmp_path / "bare")
    with pytest.raises(RimLensError) as err:
        rl.Lab.open(bare)
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert "rim_memory.json" in message and "spec=" in message and "data=" in message
    spec = json.loads((tiny_runs["rim"] / "model" / "rim_memory.json").read_text())
    with pytest.raises(RimLensError, match="data=FILE"):
        rl.Lab.open(bare, spec=spec)
    with pytest.raises(RimLensError, match="spec: .*'blocks'"):
        rl.Lab.open(bare, spec={**spec, "blocks": 8}, data="x.txt")


def test_a_bare_directory_opened_with_a_spec_is_the_run(tiny_runs, tmp_path):
    run = tiny_runs["rim"]
    bare = bare_copy(run / "model", tmp_path / "bare")
    spec_file = run / "model" / "rim_memory.json"
    spec = rl.MemorySpec(**json.loads(spec_file.read_text()))
    data = run / "data" / "test.jsonl"
    reference = rl.Lab.open(run, n=40)
    for given in (spec, spec_file, json.loads(spec_file.read_text())):
        lab = rl.Lab.open(bare, spec=given, task="gsm8k", data=data, n=40)
        assert lab.run is None and lab.spec == reference.spec
        assert lab.accuracy().value == reference.accuracy().value
    # A run's own model/ carries its spec: no spec needed.
    assert rl.Lab.open(run / "model", data=data, n=40).spec == reference.spec


def test_patch_with_your_own_pairs_finds_a_known_carrier(tiny_runs):
    """The copy-task RiM routes its answer through its blocks (its readout cannot see the
    question): patching the clean blocks into the corrupt run brings the clean answer back;
    its pause control, which copies from the question, gets nothing back."""
    recovery = {}
    for name in ("rim", "pause"):
        lab = rl.Lab.open(tiny_runs[name], n=8)
        result = lab.patch(pairs=PAIRS, layers=[1])
        assert set(result.table["block"]) == {1, 2} and (result.table["n"] == len(PAIRS)).all()
        recovery[name] = result.sets.query("scope == 'all'")["recovery"].item()
    assert recovery["rim"] > 0.8 and abs(recovery["pause"]) < 0.2, recovery


def test_pairs_are_checked(tiny_runs):
    lab = rl.Lab.open(tiny_runs["rim"], n=4)
    with pytest.raises(RimLensError, match=r"pairs\[0\]: clean and corrupt have the same answer"):
        lab.patch(pairs=[(PAIRS[0][0], PAIRS[0][0])])
    with pytest.raises(RimLensError, match=r"pairs\[0\]: expected \(clean, corrupt\)"):
        lab.patch(pairs=[(PAIRS[0][0],)])


def test_patch_at_layer_2_block_3_of_a_gsm8k_checkpoint_trained_elsewhere(reference_data, tmp_path):
    """The issue's task: a plain HF directory, its spec passed in, GSM8K pairs of your own."""
    from rim_lens.model.checkpoints import build_model
    from rim_lens.model.tokenizer import build_word_tokenizer

    with open(reference_data / "gsm8k" / "valid.txt") as f:
        lines = [line.rstrip("\n") for line in islice(f, 4)]
    spec = rl.MemorySpec(K=4, M=1, task="gsm8k")
    tok = build_word_tokenizer(lines + copy_lines(20), spec)
    model = build_model(tok, "llama", "small", max_positions=512)
    model.save_pretrained(tmp_path / "elsewhere")
    tok.save_pretrained(tmp_path / "elsewhere")
    lab = rl.Lab.open(tmp_path / "elsewhere", spec=spec, data=reference_data / "gsm8k" / "valid.txt", n=4)
    table = lab.patch(pairs=[(lines[0], lines[1]), (lines[2], lines[3])], layers=[2], blocks=[3]).table
    assert table[["layer", "block", "n"]].values.tolist() == [[2, 3, 2]]
    assert table["logit_diff"].notna().all()
