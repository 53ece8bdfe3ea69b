"""Analyses on a Coconut model: its continuous thought k is block k, slot 0, captured and
intervened on through the same engine as RiM's blocks (`backends.HFBackend` runs the thought
passes). The reference is the plain definition, one example at a time with no cache or padding:
thought k's input is the final hidden state of a fresh run on everything before its position.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fixtures import COCONUT_THOUGHTS, clone_runs, random_coconut

from rim_lens.analysis.engine import Variant, sweep
from rim_lens.analysis.interventions import Add, Patch
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.report import compared_runs
from rim_lens.errors import RunError
from rim_lens.model import coconut
from rim_lens.model.layouts import Layout, Role, block_positions

torch.set_num_threads(1)
N_THOUGHTS = COCONUT_THOUGHTS


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lab(request, tmp_path_factory) -> Lab:
    """A session over an untrained Coconut checkpoint with large random weights (every thought
    moves the logits) and chains of 1-4 steps (questions of different lengths: padded rows)."""
    model, tok, spec, task = random_coconut(tmp_path_factory.mktemp("coconut") / "model", request.param)
    examples = task.generate(8, seed=7)
    assert len({len(ex.question.split()) for ex in examples}) > 1
    return Lab.from_model(model, tok, spec, examples, task=task, out=tmp_path_factory.mktemp("lab"))


@torch.no_grad()
def manual_states(model, seq: Layout, edit: dict[int, torch.Tensor] | None = None):
    """(hidden states of the whole prompt, n_layers + 1 of [S, d] as HF returns them: resid[l] for
    l < n_layers, then the last layer's output after the final norm; thought positions). Thought k
    is filled in from a fresh run on the prefix before it; `edit` replaces thought k by a vector
    before the later thoughts are computed."""
    ids, pos = torch.tensor([seq.ids]), torch.tensor([seq.positions])
    embeds = model.get_input_embeddings()(ids).clone()
    where = [i for i, r in enumerate(seq.roles) if r == Role.THOUGHT]
    for k, p in enumerate(where, start=1):
        out = model(inputs_embeds=embeds[:, :p], position_ids=pos[:, :p], output_hidden_states=True)
        embeds[0, p] = edit[k] if edit and k in edit else out.hidden_states[-1][0, -1]
    out = model(inputs_embeds=embeds, position_ids=pos, output_hidden_states=True)
    return [h[0] for h in out.hidden_states], where


def final_norm(lab: Lab) -> torch.nn.Module:
    return lab.backend.module("transformer.ln_f" if lab.model.config.model_type == "gpt2" else "model.norm")


def fed(lab: Lab, resid0: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The vector fed at a position from resid[0] there (GPT-2 adds its position embedding)."""
    if lab.model.config.model_type == "gpt2":
        return resid0 - lab.model.transformer.wpe(positions)
    return resid0


@torch.no_grad()
def test_capture_gives_labelled_thought_states_equal_to_a_manual_loop(lab):
    store = lab.capture().store
    n_layers = lab.backend.n_layers
    assert (store.K, store.slots, store.layers) == (N_THOUGHTS, ["<thought>"], list(range(n_layers + 1)))
    assert all(len(r["readouts"]) == N_THOUGHTS for r in store.examples), "a readout after each thought"
    for row, ex in enumerate(lab.examples):
        states, where = manual_states(lab.model, lab.builder.prompt(ex))
        for k, p in enumerate(where, start=1):
            for l in range(n_layers):
                got = torch.from_numpy(store.resid(layer=l, block=k, slot=0)[row])
                torch.testing.assert_close(got, states[l][p], atol=1e-4, rtol=1e-4)
            # The last layer's output at thought k, through the final norm, is thought k + 1.
            last = final_norm(lab)(torch.from_numpy(store.resid(layer=n_layers, block=k, slot=0)[row]))
            torch.testing.assert_close(last, states[-1][p], atol=1e-4, rtol=1e-4)
            if k < N_THOUGHTS:
                position = torch.tensor(lab.builder.prompt(ex).positions[where[k]])
                torch.testing.assert_close(
                    fed(lab, states[0][where[k]], position), last, atol=1e-4, rtol=1e-4
                )


@torch.no_grad()
def test_identity_intervention_leaves_the_logits_unchanged(lab):
    seqs = [lab.builder.scored(ex) for ex in lab.examples]
    sel = lab.select()
    identity = Add(torch.zeros(lab.backend.d_model))
    out = sweep(
        lab.backend, lab.builder, seqs, [Variant(), Variant(sel.sites(), identity)], lambda x, b, e: x
    )
    assert out[0].abs().max() > 1.0, "logits far from zero: the comparison is not vacuous"
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)
    # The engine's intact run is the thought passes' run.
    passes = coconut.thought_forward(lab.model, lab.builder.collate(seqs, side="left"))
    torch.testing.assert_close(out[0], passes.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [0, 1])
@torch.no_grad()
def test_patching_thought_k_recomputes_the_later_thoughts(lab, layer):
    """Thought 2 at `layer` given another example's: thought 1 stays, thought 2 changes above
    `layer`, and thought 3 is recomputed from it (what pass 2 feeds back moves); for Llama at
    layer 0 the patched run is exactly `intervene` replacing thought 2 by the donor's."""
    k, n_layers = 2, lab.backend.n_layers
    targets, donors = lab.examples, lab.examples[1:] + lab.examples[:1]
    sel = lab.select(layers=[layer], blocks=[k])
    patch = lab.fit(Patch(from_=donors), targets, sel)
    batch = lab.builder.collate([lab.builder.prompt(ex) for ex in targets], side="left")
    rows = torch.arange(len(targets))
    every = list(range(n_layers + 1))
    clean = lab.backend.forward(batch, capture=every)
    edited = lab.backend.forward(
        batch, capture=every, edits=Variant(sel.sites(), patch).edits(batch, rows, rows)
    )
    pos = block_positions(batch)[:, :, 0]
    at = lambda out, l, j: out.resid[l][rows, pos[:, j - 1]]  # noqa: E731 - thought j's states, all rows
    for l in every:
        torch.testing.assert_close(at(edited, l, 1), at(clean, l, 1), atol=1e-5, rtol=0)
    # Captures read resid[l] before layer l's own edit: thought k changes only from layer + 1 on.
    torch.testing.assert_close(at(edited, layer, k), at(clean, layer, k), atol=1e-5, rtol=0)
    assert (at(edited, layer + 1, k) - at(clean, layer + 1, k)).abs().amax(-1).min() > 1e-3
    moved = (at(edited, 0, k + 1) - at(clean, 0, k + 1)).abs().amax(-1)
    assert moved.min() > 1e-3, "thought k + 1 is computed from the patched thought k"
    # What is fed at thought k + 1 is the final norm of the last layer's output at thought k.
    positions = batch.position_ids[rows, pos[:, k]]
    torch.testing.assert_close(
        fed(lab, at(edited, 0, k + 1), positions),
        final_norm(lab)(at(edited, n_layers, k)),
        atol=1e-4,
        rtol=1e-4,
    )
    if layer == 0 and lab.model.config.model_type == "llama":
        # For Llama resid[0] is the fed vector: a layer-0 patch is `intervene` on thought k, and
        # the manual loop with thought k replaced.
        donor = lab.states(donors, layers=[0]).at(0, k, 0)
        ref = coconut.thought_forward(lab.model, batch, intervene=lambda j, h: donor if j == k else h)
        torch.testing.assert_close(edited.logits, ref.logits, atol=1e-5, rtol=0)
        states, where = manual_states(lab.model, lab.builder.prompt(targets[0]), edit={k: donor[0]})
        torch.testing.assert_close(at(edited, 1, k + 1)[0], states[1][where[k]], atol=1e-4, rtol=1e-4)


def test_causal_analyses_label_thoughts_as_blocks(lab):
    blocks = set(range(1, N_THOUGHTS + 1))
    for mode in ("zero", "mean", "resample"):
        table = lab.ablate(mode=mode).table
        assert set(table.loc[table["scope"] == "block", "block"]) == blocks
    knock = lab.knockout().table
    assert set(knock.loc[knock["knockout"] == "answer->block", "block"].dropna()) == blocks
    patched = lab.patch()
    assert patched.record["options"]["method"] == "full", "exact cannot recompute the thoughts"
    assert set(patched.table["block"]) == blocks and set(patched.table["layer"]) == set(
        range(lab.backend.n_layers)
    )
    for method in ("exact", "attribution"):
        with pytest.raises(RunError, match="Coconut"):
            lab.patch(method=method)
    swapped = lab.interchange(layers=[0])
    assert set(swapped.table["block"].dropna()) == blocks
    probe = lab.probe(n_boot=50)
    assert set(probe.table["block"]) <= blocks


# -- the report ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coconut_family(tiny_modchain_runs, tmp_path_factory):
    """The modchain family (rim, pause, direct) with a briefly trained Coconut run beside them."""
    from fixtures import MODCHAIN_OPTIONS, _config

    from training.trainer import train

    runs = clone_runs(tiny_modchain_runs, tmp_path_factory.mktemp("family"))
    data_dir = runs["rim"].parent / "data"
    data = {name: str(data_dir / f"{name}.jsonl") for name in ("train", "val")}
    data["test"] = str(data_dir / "eval.jsonl")
    cfg = _config("coconut", {}, 60, {"name": "modchain", "options": MODCHAIN_OPTIONS}, data)
    cfg = dataclasses.replace(cfg, coconut=dataclasses.replace(cfg.coconut, c=1, stages=2))
    runs["coconut"] = runs["rim"].parent / "coconut"
    train(cfg, runs["coconut"], overwrite=True)
    return runs


def test_the_report_puts_rim_pause_and_coconut_side_by_side(coconut_family, capsys):
    from rim_lens.cli import main

    runs = coconut_family
    assert compared_runs(runs["rim"]) == [runs["coconut"]]
    assert compared_runs(runs["coconut"]) == [runs["rim"]]
    assert main(["analyze", "report", str(runs["coconut"]), "--n", "16"]) == 0
    out = runs["coconut"] / "analysis"
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["method"] == "coconut" and report["control"]["method"] == "pause"
    assert [card["method"] for card in report["compared"]] == ["rim"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Do the continuous thoughts carry the reasoning?")
    head = next(line for line in md.splitlines() if line.startswith("| figure |"))
    assert "coconut" in head and "control: pause" in head and "rim" in head
    assert report["run"]["accuracy_intact"]["n"] == 16
