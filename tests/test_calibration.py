"""Every finding of the causal report on known positives and known negatives, end to end: the same
path `rim-lens analyze report` takes (`report.measure`, `report.measure_variables`, then
`verdict.findings`), on hand-built models whose weights are SET (`planted`), so the outcomes are the
same on every CPU; then the calibration command on a run, and what the trained question-blind
family needs of the variables and location tests.

The planted models: 2x2 multiplication, 2 layers of width 24, K = 3 blocks of M = 2 memory slots
(block 3 holds only the question, as the demo's later blocks). The positive stores step t's value in
every memory slot of block t, beside the question; the matched negative stores nothing and computes
the steps at the readout; both are right on every example. The control of every trial is another
negative (seed 1).
"""

from __future__ import annotations

import functools
import json
import random

import pandas as pd
import pytest
import torch

from rim_lens.analysis import abstraction as ab
from rim_lens.analysis import calibration, verdict
from rim_lens.analysis.abstraction import RANKS, UNDERFIT
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.planted import planted
from rim_lens.analysis.verdict import GROUNDING, NOT_DETECTED, PARTIAL, SUPPORTED
from rim_lens.data.tasks import get_task
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer

torch.set_num_threads(1)

TASK = get_task("mult", n=2)
SPEC = MemorySpec(method="rim", K=3, M=2, task="mult")
LAYERS, WIDTH = 2, 24
N, TRAIN, VAL = 200, 2000, 300  # the report's default n; the conditional probes' training states


@pytest.fixture(scope="module")
def world():
    """(tokenizer, (train, validation, test) examples): 2x2 questions split by canonical key."""
    examples = TASK.generate(2900, seed=0)
    keys = sorted({TASK.key(ex.question) for ex in examples})
    random.Random(0).shuffle(keys)
    part = {k: 0 if i < 180 else 1 if i < 500 else 2 for i, k in enumerate(keys)}
    split = [[ex for ex in examples if part[TASK.key(ex.question)] == p] for p in range(3)]
    test, val, train = split[0][:N], split[1][:VAL], split[2][:TRAIN]
    texts = [t for ex in examples for t in (ex.question, ex.answer, *ex.steps)]
    return build_word_tokenizer(texts, SPEC), (train, val, test)


def lab_of(world, stored, seed: int, tmp_path_factory) -> Lab:
    tok, (_, _, test) = world
    model = planted(tok, SPEC, TASK, LAYERS, WIDTH, stored=stored, seed=seed)
    return Lab.from_model(model, tok, SPEC, test, task=TASK, out=tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def labs(world, tmp_path_factory) -> dict[str, Lab]:
    made = {"positive": None, "negative": (), "block 1 only": [1], "control": ()}
    seeds = {"control": 1}
    return {
        name: lab_of(world, stored, seeds.get(name, 0), tmp_path_factory) for name, stored in made.items()
    }


def test_every_finding_on_the_planted_positive_and_negative(world, labs):
    """The whole card on each control (one test: the cards are costly, and several tests asking
    for them could each make them on another pytest-xdist worker)."""
    sets = world[1][:2]
    cards = {name: calibration.card(lab, sets) for name, lab in labs.items()}
    found = {
        name: {
            f.name: f for f in calibration.trial(labs[name], labs["control"], (cards[name], cards["control"]))
        }
        for name in ("positive", "negative")
    }
    for name, card in cards.items():  # every planted model answers every question
        assert card["accuracy_intact"]["value"] == 1.0 and card["n_correct"] == N, name

    # Every finding supported on the positive, none on the negative.
    positive, negative = found["positive"], found["negative"]
    assert [f.outcome for f in positive.values()] == [SUPPORTED] * 5, [f.line() for f in positive.values()]
    assert positive["location"].parts == {GROUNDING: SUPPORTED}, positive["location"].detail
    assert all(f.outcome == NOT_DETECTED for f in negative.values()), [f.line() for f in negative.values()]
    assert negative["location"].parts == {GROUNDING: NOT_DETECTED}

    # The figures behind them sit where the construction puts them.
    pos, neg = cards["positive"], cards["negative"]
    # Necessity: ablating the blocks takes the positive to (near) zero, and the negative nowhere.
    assert (
        pos["accuracy_all_blocks_ablated"]["hi"] < 0.2 and neg["accuracy_all_blocks_ablated"]["value"] == 1.0
    )
    # Sufficiency: the donor's blocks carry the donor's answer, or nothing.
    assert (
        pos["interchange_transfer_rate"]["value"] == 1.0 and neg["interchange_transfer_rate"]["value"] == 0.0
    )
    # Decodability: the block adds the value's digits to the question's states, or nothing.
    assert pos["decodability_gain"]["lo"] > 0.3 and pos["decodability_scores"]["question_and_block"] == 1.0
    assert abs(neg["decodability_gain"]["value"]) < 0.02
    # Location: every block at layer 1 restores the clean run; block t restores what changes step t only.
    assert pos["blocks_carry_recovery"]["value"] == pytest.approx(1.0) and pos["blocks_carry_layer"] == 1
    assert neg["blocks_carry_recovery"]["value"] == pytest.approx(0.0)
    for t in ("1", "2"):
        blocks = pos["grounding"][t]["blocks"]
        assert blocks[t]["value"] == pytest.approx(1.0)
        assert all(abs(e["value"]) < 1e-6 for k, e in blocks.items() if k != t)
    # Variables: each step's value sits in the (cos, sin) codes of its 3 varying digits, in both
    # memory slots of its block: no subspace of fewer than 6 directions holds it; the rank sweep over
    # the joint unit (every slot of the blocks up to t) finds it.
    variables = positive["variables"]
    assert set(variables.run) == {"step1", "step2"} and all(e.value >= 0.85 for e in variables.run.values())
    table = pd.read_parquet(labs["positive"].out / "abstraction.parquet")
    das = table[(table["basis"] == "das") & (table["variable"] == "step1")]
    assert (das["slot"] == -1).all() and das["iia_train"].max() >= 0.99
    assert (das.loc[das["rank"] < 6, "iia_train"] <= 0.2).all()

    # The hand-built model: block 1 stores step 1, the answer is computed from it and the
    # question. Transfer is rare, but the answer moves to the causal model's counterfactual.
    partial = {f.name: f for f in verdict.findings(cards["block 1 only"], cards["control"])}
    assert partial["sufficiency"].outcome == PARTIAL, partial["sufficiency"].detail
    assert partial["necessity"].outcome == SUPPORTED and partial["decodability"].outcome == SUPPORTED
    assert partial["location"].parts == {GROUNDING: NOT_DETECTED}  # step 2 is not in block 2
    card = cards["block 1 only"]
    assert card["interchange_transfer_rate"]["hi"] < 0.3 and card["interchange_changed_rate"]["lo"] > 0.7
    assert card["interchange_logprob_gain"]["lo"] > 0
    step1 = card["value_interchange"]["1"]
    assert step1["block"] == 1 and step1["unmatched_moves"]["value"] == step1["matched_stays"]["value"] == 1.0
    assert cards["control"]["value_interchange"]["1"]["unmatched_moves"]["value"] == 0.0


@pytest.mark.parametrize("size", [200, TRAIN])
def test_conditional_probes_on_planted_captures(world, labs, size):
    """At 200 and at 2,000 training states, what a block adds to the question: the step's digits
    in the positive, nothing in the negative (whose block holds the question alone)."""
    train, val, _ = world[1]
    pos = labs["positive"].conditional_probe(train[:size], val).summary
    neg = labs["negative"].conditional_probe(train[:size], val).summary
    assert pos["gain"].lo > 0.3 and pos["question_and_block"] == 1.0
    assert neg["gain"].lo <= 0 and neg["gain"].value < 0.02


def test_calibrate_writes_detection_rates_that_the_report_reads(world, tmp_path, monkeypatch):
    """`rim-lens analyze calibrate RUN` on a run: rates per finding over the planted seeds at the
    run's own architecture, in analysis/calibration.json."""
    from rim_lens.cli import main
    from rim_lens.model import checkpoints

    monkeypatch.setitem(checkpoints.PRESETS, "tiny", (LAYERS, WIDTH, 2))
    # Fewer DAS pairs: this checks the command, not the rates' values (the test above does).
    monkeypatch.setattr(ab, "make_pairs", functools.partial(ab.make_pairs, n=32))
    run = mult_run(tmp_path / "runs" / "rim", world)
    assert main(["analyze", "calibrate", str(run), "--n", "40", "--seeds", "2"]) == 0
    saved = json.loads((run / "analysis" / "calibration.json").read_text())
    assert saved["n"] == 40 and saved["seeds"] == 2
    shape = {"layers": LAYERS, "width": WIDTH, "K": 3, "M": 2, "task": "mult", "options": {"n": 2}}
    assert saved["architecture"] == shape and saved["train"] == 200 and saved["validation"] == 60
    assert set(saved["findings"]) == set(verdict.FINDINGS)
    for name, f in saved["findings"].items():
        assert 0 <= f["detection"] <= 1 and 0 <= f["false_positive"] <= 1, name
        assert len(f["outcomes"]["positive"]) == 2
    assert saved["findings"]["necessity"]["detection"] == 1.0
    assert saved["findings"]["necessity"]["false_positive"] == 0.0
    assert GROUNDING in saved["findings"]["location"]["parts"]


def mult_run(path, world):
    """A run directory holding an untrained GPT-2 on 2x2 multiplication (calibration reads only its
    shape, tokenizer and examples)."""
    import yaml

    from rim_lens.data import write_examples
    from rim_lens.model.checkpoints import build_model, save_checkpoint

    tok, (train, val, test) = world
    model = build_model(tok, "gpt2", "tiny", max_positions=64)
    save_checkpoint(model, tok, SPEC, path / "model")
    for name, examples in (("train", train[:200]), ("val", val[:60]), ("test", test)):
        write_examples(path / "data" / f"{name}.jsonl", examples)
    (path / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "mult", "options": {"n": 2}}}))
    return path


# -- the trained question-blind family: its answer passes through the blocks ------------------------
@pytest.fixture(scope="module")
def blind(tiny_modchain_runs) -> Lab:
    """The modchain RiM whose readout sees only its blocks (2 layers, K = 2, M = 1); every step's
    value is the chain's start value, held redundantly wherever the answer is."""
    return Lab.open(tiny_modchain_runs["rim"], n=60)


def test_every_block_at_the_last_layer_is_everything_a_blind_readout_reads(blind):
    """Location over sets of blocks: the blind readout reads nothing but the blocks, whose layer-0
    states are their tokens' embeddings, so patching every block at layer 1 restores the clean run
    exactly, on any weights (a single block at a time can not be relied on to)."""
    patched = blind.patch()
    carried = patched.carried()
    assert carried["layer"] == 1 and carried["recovery"].value == pytest.approx(1.0, abs=1e-3)
    everything = patched.sets[patched.sets["scope"] == "all"].iloc[0]
    assert everything["recovery"] == pytest.approx(1.0, abs=1e-3)
    assert len(patched.changed) == len(patched.clean) and all(patched.changed)


def test_das_reaches_the_whole_state_on_the_blind_family(blind):
    """Variables with enough capacity: jointly over both blocks, DAS reaches the IIA of swapping
    their whole states (the source's answer, by construction here), not under-fit."""
    entry = blind.abstraction(["step2"], rank=list(RANKS), joint=True, grid=False, controls=False).best(
        "step2"
    )
    assert entry["group"] is not None and entry["full_train"] == pytest.approx(1.0)
    assert not entry["underfit"] and entry["iia_train"] >= entry["full_train"] - UNDERFIT, entry
