"""The analysis session: the short API as the README shows it, one selection signature and typed
results for every analysis, named serialisable interventions, and captures that are reused only
while they are exactly what the session would capture now."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from fixtures import clone_runs

import rim_lens as rl
from rim_lens.analysis.interventions import Intervention
from rim_lens.analysis.results import Result
from rim_lens.errors import ConfigError, RunError

torch.set_num_threads(1)

N = 16


@pytest.fixture(scope="module")
def runs(tiny_modchain_runs, tmp_path_factory):
    return clone_runs(tiny_modchain_runs, tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def lab(runs) -> rl.Lab:
    return rl.Lab.open(runs["rim"], n=N)


def test_the_short_api_as_written(runs, tmp_path):
    lab = rl.Lab.open(runs["rim"], n=N)
    table = lab.ablate(blocks=[1], mode="mean").table
    assert set(table["scope"]) == {"intact", "block", "cumulative", "all"} and (table["n"] == N).all()
    assert lab.examples[0].id and lab.source.endswith(f"data/test.jsonl[:{N}]")
    answers = lab.decode(rl.Patch(from_=lab.examples[1]), blocks=[1, 2]).answers
    assert len(answers) == N


@pytest.mark.parametrize(
    "method, options, stems",
    [
        ("capture", {}, []),
        ("pca", {"layers": [1, 2], "blocks": [2], "slots": [0, 2]}, ["pca", "pca_input_dependence"]),
        ("probe", {"layers": [2], "slots": [2]}, ["probe_correctness", "probe_values"]),
        ("lens", {"layers": [2], "blocks": [1]}, ["lens", "lens_quality"]),
        ("ablate", {"layers": [1], "blocks": [1], "slots": [1], "mode": "zero"}, ["ablate"]),
        ("knockout", {"blocks": [2], "slots": [0, 1]}, ["knockout"]),
        ("patch", {"layers": [1], "blocks": [1, 2]}, ["patch"]),
        ("interchange", {"layers": [1], "blocks": [2]}, ["interchange"]),
        ("decode", {"intervention": rl.Zero(), "layers": [1], "blocks": [2]}, ["decode"]),
    ],
)
def test_every_analysis_takes_one_selection_and_returns_a_typed_result(lab, tmp_path, method, options, stems):
    result = getattr(lab, method)(**options)
    assert isinstance(result, Result) and len(result.table) > 0
    assert result.figure().to_dict()["data"]
    record = result.record
    assert record["fingerprint"] and record["model"] == lab.model_fingerprint
    assert record["options"]["backend"] == "hf" and record["options"]["examples"]["n"] == N
    selection = record["options"]["selection"]
    for key in ("layers", "blocks", "slots"):
        if key in options and selection is not None:
            assert selection[key] == options[key]
    for column in ("layer", "block", "slot"):
        if column in result.table and f"{column}s" in options:
            assert set(result.table[column].dropna()) <= set(options[f"{column}s"])
    out = result.save(tmp_path)
    for stem in stems:
        assert (out / f"{stem}.parquet").exists()
    summary_stem = result.summary_stem or result.name
    if method != "capture":
        saved = json.loads((out / f"{summary_stem}.json").read_text())
        assert saved["record"]["fingerprint"] == record["fingerprint"]
        assert list(out.glob("*.fig.json"))


def test_selection_errors_are_one_line(lab):
    with pytest.raises(RunError, match=r"layer \[5\] out of range: layers are 0..1"):
        lab.ablate(layers=[5])
    with pytest.raises(RunError, match=r"block \[3\] out of range: blocks are 1..2"):
        lab.patch(blocks=[3])
    with pytest.raises(RunError, match="knockout acts on every layer"):
        lab.knockout(layers=[1])
    with pytest.raises(RunError, match="unknown ablation mode 'half'"):
        lab.ablate(mode="half")


def test_blocks_are_labelled_from_one(lab):
    """Tables label blocks 1..K; the states of block k are the k-th block of the prompt."""
    from rim_lens.model.layouts import block_positions

    ex = lab.examples[0]
    states = lab.states([ex])
    batch = lab.builder.collate([lab.builder.prompt(ex)])
    out = lab.backend.forward(batch, capture=[2])
    pos = block_positions(batch)[0]
    torch.testing.assert_close(states.at(2, 2, 1)[0], out.resid[2][0, pos[1, 1]])
    assert sorted(states.norms()["block"].unique()) == [1, 2]
    assert sorted(lab.readouts(ex)["block"]) == [1, 2]


# -- interventions ------------------------------------------------------------------------------------
def test_interventions_are_named_and_serialisable(lab):
    examples = lab.examples
    for iv in (
        rl.Zero(),
        rl.Mean(),
        rl.Resample(seed=3),
        rl.Patch(from_=examples[:2]),
        rl.Add([0.5] * 64, 2.0),
    ):
        d = iv.to_dict()
        json.dumps(d)
        again = Intervention.from_dict(d)
        assert type(again) is type(iv) and again.to_dict() == d
    assert rl.Patch(from_=examples[0]).to_dict() == {"kind": "patch", "from_": [examples[0].id]}
    assert rl.Resample(seed=3).to_dict() == {"kind": "resample", "seed": 3}
    with pytest.raises(ConfigError, match="unknown intervention 'blur'"):
        Intervention.from_dict({"kind": "blur"})
    # A patch rebuilt from ids finds its sources among the session's examples.
    patched = lab.decode(rl.Patch(from_=examples[1]), blocks=[1, 2])
    rebuilt = lab.decode(Intervention.from_dict(rl.Patch(from_=examples[1]).to_dict()), blocks=[1, 2])
    assert patched.answers == rebuilt.answers


def test_a_user_written_intervention(lab):
    class Scale(Intervention):
        kind = "scale-for-tests"

        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __call__(self, base, site, rows):
            return self.factor * base

    assert Intervention.from_dict({"kind": "scale-for-tests", "factor": 0.0}).factor == 0.0
    zeroed = lab.ablate(mode=Scale(0.0), blocks=[1])
    assert zeroed.record["options"]["intervention"] == {"kind": "scale-for-tests", "factor": 0.0}
    assert zeroed.table["logprob"].tolist() == pytest.approx(
        lab.ablate(mode="zero", blocks=[1]).table["logprob"].tolist()
    )
    same = lab.ablate(mode=Scale(1.0)).table
    assert (same["logprob_change"].abs() < 1e-5).all()


def test_add_moves_the_states_by_the_vector(lab):
    sel = lab.select(layers=[1], blocks=[1], slots=[1])
    add = lab.fit(rl.Add(torch.ones(64), scale=0.5), lab.examples, sel)
    base = torch.zeros(3, 64)
    torch.testing.assert_close(add(base, rl.Site(1, 1, 1), torch.arange(3)), torch.full((3, 64), 0.5))
    mean = lab.fit(rl.Mean(), lab.examples, sel)
    expected = lab.states(layers=[1]).at(1, 1, 1).mean(0)
    torch.testing.assert_close(mean(base, rl.Site(1, 1, 1), torch.arange(3))[0], expected)
    resample = lab.fit(rl.Resample(seed=0), lab.examples, sel)
    donors = resample.donors_.tolist()
    assert all(lab.examples[d].question != ex.question for d, ex in zip(donors, lab.examples))


# -- fingerprints ----------------------------------------------------------------------------------------
def test_capture_is_reused_only_on_an_exact_match(runs, tmp_path):
    run = clone_runs({"rim": runs["rim"]}, tmp_path)["rim"]
    shutil.rmtree(run / "analysis", ignore_errors=True)
    meta = run / "analysis" / "capture" / "meta.json"

    first = rl.Lab.open(run, n=N).capture()
    stamp = meta.stat().st_mtime_ns
    assert rl.Lab.open(run, n=N).capture().record == first.record
    assert meta.stat().st_mtime_ns == stamp, "the same model, examples and options: reused"

    for other in (rl.Lab.open(run, n=N - 1), rl.Lab.open(run, n=N, backend="nnsight")):
        again = other.capture()
        assert again.record["fingerprint"] != first.record["fingerprint"], (
            "other examples or backend: recomputed"
        )
        assert meta.stat().st_mtime_ns != stamp
        stamp = meta.stat().st_mtime_ns
    rl.Lab.open(run, n=N).capture()
    stamp = meta.stat().st_mtime_ns

    # Retrain (here: alter) the weights: the capture on disk is stale and is recomputed.
    lab = rl.Lab.open(run, n=N)
    with torch.no_grad():
        for p in lab.model.parameters():
            p.add_(0.01)
    lab.model.save_pretrained(run / "model")
    altered = rl.Lab.open(run, n=N)
    assert altered.model_fingerprint != first.record["model"]
    recaptured = altered.capture()
    assert meta.stat().st_mtime_ns != stamp
    assert recaptured.record["model"] == altered.model_fingerprint
    states = torch.from_numpy(recaptured.store.resid(layer=2))
    torch.testing.assert_close(states, altered.states(layers=[2]).states[:, 0])


def test_a_direct_model_is_scored_but_has_no_blocks(runs):
    lab = rl.Lab.open(runs["direct"], n=N)
    assert 0 <= lab.accuracy().value <= 1 and lab.accuracy().n == N
    assert len(lab.decode().answers) == N
    with pytest.raises(RunError, match="a direct model has no memory blocks to analyse"):
        lab.ablate()


def test_runs_before_the_val_test_split_read_data_eval(runs, tmp_path):
    run = clone_runs({"rim": runs["rim"]}, tmp_path)["rim"]
    (run / "data" / "test.jsonl").rename(run / "data" / "eval.jsonl")
    lab = rl.Lab.open(run, n=4)
    assert lab.source.endswith("data/eval.jsonl[:4]") and len(lab.examples) == 4
    (run / "data" / "eval.jsonl").unlink()
    with pytest.raises(RunError, match="run has no data/test.jsonl"):
        rl.Lab.open(run, n=4)
    assert rl.Lab.open(run, n=4, split="val").source.endswith("data/val.jsonl[:4]")


def test_import_is_lazy():
    """`import rim_lens` (and so `rim-lens --help`) does not load torch; names load on use."""
    code = (
        "import sys, rim_lens; assert 'torch' not in sys.modules; rim_lens.Method; "
        "print(sorted(rim_lens.__all__)[:2])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['Add', 'BlockStates']"


@pytest.mark.parametrize("backend", ["tl", "nnsight"])
def test_every_backend_runs_every_analysis_with_the_same_results(runs, backend):
    import numpy as np
    import pandas as pd

    hf = rl.Lab.open(runs["rim"], n=8)
    other = hf.with_backend(backend)
    assert other.backend.name == backend and other.examples == hf.examples
    calls = {
        "ablate": dict(mode="resample"),
        "knockout": {},
        "patch": dict(per_slot=True),
        "interchange": {},
        "decode": dict(intervention=rl.Mean(), blocks=[1]),
        "lens": dict(layers=[1, 2]),
        "pca": {},
    }
    for method, options in calls.items():
        a, b = getattr(hf, method)(**options).table, getattr(other, method)(**options).table
        numeric = [c for c in a.columns if pd.api.types.is_float_dtype(a[c]) and c != "logprob"]
        pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
        np.testing.assert_allclose(
            a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-4, err_msg=method
        )
