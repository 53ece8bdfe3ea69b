"""The hook backends (plain HF hooks, TransformerLens' TransformerBridge, nnsight) against each
other, and block states against padding.

Checkpoints: a GPT-2 and a Llama tiny model with random weights (drawn larger than the default
init, so that hidden states and logits are far from zero and a wrong hook would show), saved to
disk and reloaded the way every analysis loads them; TransformerLens boots from the directory.
The GPT-2 one uses `readout_sees_question: false`, the Llama one the default, so both mask
layouts are covered. Questions are modchain chains of 1-3 operations: batches are padded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import random_checkpoint

from rim_lens.analysis.backends import BACKENDS, Edit, make_backend
from rim_lens.analysis.capture import CaptureStore, block_states, capture
from rim_lens.data.tasks import get_task
from rim_lens.errors import RunError
from rim_lens.model.checkpoints import load_checkpoint
from rim_lens.model.layouts import Role, SequenceBuilder, block_positions

torch.set_num_threads(1)

ATOL = 1e-5
ARCHS = ("gpt2", "llama")
TASK_OPTIONS = {"min_length": 1, "max_length": 3, "modulus": 10}


class Setup:
    def __init__(self, arch: str, root):
        self.task = get_task("modchain", **TASK_OPTIONS)
        self.examples = self.task.generate(8, seed=3)
        lengths = {len(ex.steps) for ex in self.examples}
        assert len(lengths) > 1, "the batch must mix question lengths"
        self.dir = random_checkpoint(
            root / arch, arch, task_options=TASK_OPTIONS, readout_sees_question=arch == "llama"
        )
        self.model, self.tok, self.spec = load_checkpoint(self.dir)
        self.builder = SequenceBuilder(self.tok, self.spec, self.task.join_steps)
        self.backends = {name: make_backend(name, self.model, self.tok, self.dir) for name in BACKENDS}
        self.n_layers = self.model.config.num_hidden_layers

    def batch(self, side: str = "left", examples=None):
        return self.builder.collate(
            [self.builder.prompt(ex) for ex in (examples or self.examples)], side=side
        )


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory) -> Setup:
    return Setup(request.param, tmp_path_factory.mktemp("ckpt"))


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.2e}"


# -- backend agreement ---------------------------------------------------------------------------
def test_checkpoints_are_not_trivial(setup):
    out = setup.backends["hf"].forward(setup.batch(), capture=[setup.n_layers])
    assert out.logits.abs().max() > 0.5 and out.resid[setup.n_layers].abs().max() > 1
    assert setup.model.config.model_type == ("gpt2" if setup.dir.name == "gpt2" else "llama")


@pytest.mark.parametrize("side", ["left", "right"])
def test_backends_agree_on_logits_resid_and_attention(setup, side):
    batch = setup.batch(side)
    layers, attn_layers = list(range(setup.n_layers + 1)), list(range(setup.n_layers))
    ref = setup.backends["hf"].forward(batch, capture=layers, capture_attn=attn_layers)
    assert sorted(ref.resid) == layers and sorted(ref.attn) == attn_layers
    for name in ("tl", "nnsight"):
        out = setup.backends[name].forward(batch, capture=layers, capture_attn=attn_layers)
        close(out.logits, ref.logits, f"{name} logits")
        for l in layers:
            close(out.resid[l], ref.resid[l], f"{name} resid[{l}]")
        for l in attn_layers:
            close(out.attn[l], ref.attn[l], f"{name} attn[{l}]")


def test_backends_agree_with_edits(setup):
    batch = setup.batch()
    B, S = batch.input_ids.shape
    d = setup.model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    pos = block_positions(batch)
    edits = []
    for l in range(setup.n_layers):
        # Block positions (what interventions edit) and, at layer 0, two question positions too.
        rows = torch.arange(B)
        edits.append(Edit(l, rows, pos[:, l % pos.shape[1], 1], torch.randn(B, d, generator=gen) * 2))
        edits.append(Edit(l, rows[:3], pos[:3, -1, -1], torch.randn(3, d, generator=gen) * 2))
    edits.append(
        Edit(0, torch.tensor([0, 5]), torch.tensor([S - 5, S - 6]), torch.randn(2, d, generator=gen))
    )
    layers = list(range(setup.n_layers + 1))
    intact = setup.backends["hf"].forward(batch, capture=layers)
    ref = setup.backends["hf"].forward(batch, capture=layers, edits=edits, capture_attn=[0])
    assert (ref.logits - intact.logits).abs().max() > 1e-2, "the edits must change the output"
    # resid[l] is captured before layer l's own edits are applied: it equals the unedited
    # state at layer 0, and differs from it above (earlier layers' edits propagate).
    close(ref.resid[0], intact.resid[0], "hf resid[0] before edits")
    for name in ("tl", "nnsight"):
        out = setup.backends[name].forward(batch, capture=layers, edits=edits, capture_attn=[0])
        close(out.logits, ref.logits, f"{name} edited logits")
        for l in layers:
            close(out.resid[l], ref.resid[l], f"{name} edited resid[{l}]")
        close(out.attn[0], ref.attn[0], f"{name} edited attn[0]")


def test_editing_a_state_to_its_own_value_changes_nothing(setup):
    """Overwriting resid[l] at block positions with their own clean values changes nothing."""
    batch = setup.batch()
    pos = block_positions(batch)
    l = setup.n_layers - 1
    for name, be in setup.backends.items():
        clean = be.forward(batch, capture=[l, l + 1])
        rows = torch.arange(len(setup.examples))
        edits = [
            Edit(l, rows, pos[:, k, j], clean.resid[l][rows, pos[:, k, j]])
            for k in range(2)
            for j in range(3)
        ]
        same = be.forward(batch, capture=[l + 1], edits=edits)
        close(same.logits, clean.logits, f"{name}: edit with the clean value")
        close(same.resid[l + 1], clean.resid[l + 1], f"{name}: edit with the clean value")


def test_capture_gives_the_same_states_with_every_backend(setup, tmp_path):
    stores = {}
    for name, be in setup.backends.items():
        stores[name] = capture(
            be,
            setup.builder,
            setup.task,
            setup.examples,
            tmp_path / name,
            attn=True,
            batch_size=3,
            shard_size=5,
        )
    ref = stores["hf"]
    assert ref.meta["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert ref.resid().shape == (8, setup.n_layers + 1, 2, 3, setup.model.config.hidden_size)
    for name in ("tl", "nnsight"):
        store = CaptureStore(tmp_path / name)
        assert store.meta["backend"] == name
        assert {k: v for k, v in store.meta.items() if k != "backend"} == {
            k: v for k, v in ref.meta.items() if k != "backend"
        }
        assert store.examples == ref.examples
        np.testing.assert_allclose(store.resid(), ref.resid(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(store.attn(), ref.attn(), rtol=0, atol=ATOL)
    # The stored states are the block states of the inference prompts.
    states, attn = block_states(
        setup.backends["hf"], setup.builder, setup.examples, list(range(setup.n_layers + 1)), attn=True
    )
    np.testing.assert_allclose(ref.resid(), states.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(ref.attn(), attn.numpy(), rtol=0, atol=ATOL)
    lines = [json.loads(line) for line in (tmp_path / "hf" / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [ex.id for ex in setup.examples]


# -- padding -------------------------------------------------------------------------------------
def _gather(states: dict[int, torch.Tensor], layers, pos: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(pos.shape[0])[:, None, None]
    return torch.stack([states[l][rows, pos] for l in layers], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_states_do_not_depend_on_padding(setup, backend):
    """Left- and right-padded batches of questions of different lengths give every example the
    block states (resid at every layer, attention outputs) it has when run alone, unpadded."""
    be, layers = setup.backends[backend], list(range(setup.n_layers + 1))
    attn_layers = layers[:-1]
    single = [block_states(be, setup.builder, [ex], layers, attn=True) for ex in setup.examples]
    single_resid = torch.cat([s[0] for s in single])
    single_attn = torch.cat([s[1] for s in single])
    # Unpadded single examples: nothing to pad.
    for ex in setup.examples:
        assert (setup.batch(examples=[ex]).roles != Role.PAD).all()

    left_resid, left_attn = block_states(be, setup.builder, setup.examples, layers, attn=True)
    batch = setup.batch("left")
    assert (batch.roles == Role.PAD).any(), "the batch must be padded"
    close(left_resid, single_resid, f"{backend} left-padded resid")
    close(left_attn, single_attn, f"{backend} left-padded attn")

    batch = setup.batch("right")
    assert (batch.roles[:, -1] == Role.PAD).any()
    out = be.forward(batch, capture=layers, capture_attn=attn_layers)
    pos = block_positions(batch)
    close(_gather(out.resid, layers, pos), single_resid, f"{backend} right-padded resid")
    close(_gather(out.attn, attn_layers, pos), single_attn, f"{backend} right-padded attn")

    # The readout's logits too (the last real token of each row).
    for i, ex in enumerate(setup.examples):
        alone = be.forward(setup.batch(examples=[ex])).logits[0, -1]
        last = int((batch.roles[i] != Role.PAD).sum()) - 1
        close(out.logits[i, last], alone, f"{backend} right-padded readout logits")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_architecture_is_a_run_error(tmp_path, arch, backend):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, OPTConfig

    config = (
        GPTNeoXConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        if arch == "gpt_neox"
        else OPTConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=16,
        )
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(RunError, match=f"backend {backend}: unsupported architecture '{arch}'"):
        make_backend(backend, model, None, tmp_path)


def test_backend_errors(setup):
    with pytest.raises(RunError, match="unknown backend 'jax'"):
        make_backend("jax", setup.model, setup.tok, setup.dir)
    with pytest.raises(RunError, match="needs the checkpoint directory"):
        make_backend("tl", setup.model, setup.tok, None)
    with pytest.raises(RunError, match="layer 9 out of range"):
        setup.backends["hf"].forward(setup.batch(), capture=[9])
    with pytest.raises(RunError, match="layer .* out of range: edits take layers"):
        setup.backends["hf"].forward(
            setup.batch(),
            edits=[Edit(setup.n_layers, torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 64))],
        )


# -- decoding under an intervention ------------------------------------------------------------------
@pytest.mark.parametrize("intervention", ["none", "mean", "add", "patch", "knockout"])
def test_decoding_under_an_intervention_agrees_across_backends(setup, intervention):
    """Greedy decoding with an intervention on the prompt's block states runs on every backend and
    gives the same answers, with the chosen tokens' log-probs equal within 1e-5."""
    import rim_lens as rl
    from rim_lens.analysis.engine import Knockout, Variant, decode

    labs = {
        name: rl.Lab.from_model(
            setup.model, setup.tok, setup.spec, setup.examples, name, setup.task, setup.dir
        )
        for name in BACKENDS
    }
    make = {
        "none": lambda: None,
        "mean": rl.Mean,
        "add": lambda: rl.Add(torch.linspace(-3, 3, setup.model.config.hidden_size)),
        "patch": lambda: rl.Patch(from_=setup.examples[::-1]),
    }
    results = {}
    for name, lab in labs.items():
        if intervention == "knockout":
            variant = Variant(knockout=Knockout("answer->block", 1))
            results[name] = decode(lab.backend, lab.builder, lab.examples, variant, max_new_tokens=6)
        else:
            out = lab.decode(make[intervention](), blocks=[1], max_new_tokens=6)
            results[name] = out
            assert out.record["options"]["backend"] == name
    ref = results["hf"]
    intact = labs["hf"].decode(max_new_tokens=6)
    for name in ("tl", "nnsight"):
        got = results[name]
        if intervention == "knockout":
            assert got.tokens == ref.tokens
        else:
            assert got.answers == ref.answers
        for a, b in zip(got.logprobs, ref.logprobs):
            assert len(a) == len(b)
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    if intervention in ("mean", "add", "patch"):
        # The intervention matters: some chosen token or its log-prob differs from intact decoding.
        differs = ref.answers != intact.answers or any(
            len(a) != len(b) or not np.allclose(a, b, atol=1e-3)
            for a, b in zip(ref.logprobs, intact.logprobs)
        )
        assert differs, intervention
