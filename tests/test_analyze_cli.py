"""`rim-lens analyze WHAT RUN`: every analysis runs from the command line and writes its
parquet / json / plotly files under RUN/analysis/; user errors exit 2 with one line
`rim-lens: error: ...` and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures import clone_runs

from rim_lens.analysis.registry import analyses
from rim_lens.analysis.results import load_summary
from rim_lens.analysis.results import load_table as load_result
from rim_lens.cli import main
from rim_lens.errors import RunError

torch.set_num_threads(1)

N = "24"
WHATS = tuple(analyses())
# What each analysis writes under analysis/ (tables: .parquet, summaries: .json, figures: .fig.json).
FILES = {
    "capture": ["capture/meta.json", "capture/examples.jsonl", "capture/shard_00000.safetensors"],
    "pca": [
        "pca.parquet",
        "pca.trajectories.fig.json",
        "pca_examples.parquet",
        "pca_explained.parquet",
        "pca_input_dependence.parquet",
        "pca_input_dependence.json",
        "pca_input_dependence.heatmap.fig.json",
    ],
    "probe": [
        "probe_correctness.parquet",
        "probe_correctness.auroc.fig.json",
        "probe_values.parquet",
        "probe_values.json",
        "probe_values.steps.fig.json",
        "probe_values.curves.fig.json",
    ],
    "lens": ["lens.parquet", "lens.json", "lens.top1.fig.json", "lens_quality.parquet"],
    "ablate": ["ablate.parquet", "ablate.json", "ablate.bars.fig.json"],
    "knockout": ["knockout.parquet", "knockout.json", "knockout.bars.fig.json"],
    "patch": ["patch.parquet", "patch_sets.parquet", "patch.json", "patch.heatmap.fig.json"],
    "interchange": [
        "interchange.parquet",
        "interchange_values.parquet",
        "interchange.json",
        "interchange.matrix.fig.json",
    ],
    "abstraction": [
        "abstraction.parquet",
        "abstraction.json",
        "abstraction_pairs.parquet",
        "abstraction.step1.fig.json",
        "abstraction.best.fig.json",
    ],
    "conditional": ["probe_conditional.parquet", "probe_conditional.json"],
    "calibrate": ["calibration.json"],  # tests/test_calibration.py (planted models are built for mult)
    "report": ["report.json", "report.md"],
}


# One-line error checks read stderr: keep the weight-loading bar off it (see conftest.py).
pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(scope="module")
def runs(tiny_modchain_runs, tmp_path_factory) -> dict[str, Path]:
    """A writable copy of the modchain runs, shared by this module's analyses."""
    return clone_runs(tiny_modchain_runs, tmp_path_factory.mktemp("cli"))


def strict_json(path: Path):
    def bad(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=bad)


def analyze(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(capsys, *args: str) -> str:
    """Run a command that must fail; its single stderr line."""
    code, _, err = analyze(capsys, *args)
    assert code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rim-lens: error: ") and "Traceback" not in err
    return lines[0]


# -- every analysis ------------------------------------------------------------------------------------
def test_whats_are_covered():
    assert set(FILES) == set(WHATS)


def test_calibrate_says_which_task_it_plants_in_one_line(runs, capsys):
    line = error_line(capsys, "calibrate", runs["rim"], "--n", N, "--seeds", "2")
    assert "planted controls are built for the mult task" in line and "modchain" in line


@pytest.mark.parametrize("what", [w for w in WHATS if w not in ("report", "calibrate")])
def test_analyze_writes_its_files(runs, capsys, what):
    run = runs["rim"]
    code, out, err = analyze(capsys, what, run, "--n", N)
    assert code == 0, err
    assert f"results in {run / 'analysis'}/" in out
    for name in FILES[what]:
        path = run / "analysis" / name
        assert path.exists(), name
        if name.endswith(".fig.json"):
            fig = strict_json(path)
            assert fig["data"] and "layout" in fig
        elif name.endswith(".json"):
            saved = strict_json(path)
            if name.endswith("meta.json") or what != "capture":
                # Every artefact records what it came from: model, examples, options.
                record = saved["record"]
                assert record["analysis"] == what and record["fingerprint"] and record["model"]
                assert record["options"]["examples"]["n"] == int(N)
        elif name.endswith(".parquet"):
            assert len(pd.read_parquet(path)) > 0
    if what not in ("capture", "pca", "lens"):
        table = load_result(run, FILES[what][0].removesuffix(".parquet"))
        assert len(table) > 0
    if what == "ablate":
        summary = load_summary(run, "ablate")
        assert summary["mode"] == "mean" and summary["n"] == int(N)
    if what == "patch":
        table = load_result(run, "patch")
        assert set(table["layer"]) == {0, 1} and set(table["block"]) == {1, 2}
        assert "peak" in load_summary(run, "patch")


def test_analyze_report(tiny_runs, tmp_path, capsys):
    """On the copy task (a RiM run and its direct sibling; no pause, so no control)."""
    runs = clone_runs({k: v for k, v in tiny_runs.items() if k != "pause"}, tmp_path)
    code, out, err = analyze(capsys, "report", runs["rim"], "--n", N)
    assert code == 0, err
    report = strict_json(runs["rim"] / "analysis" / "report.json")
    assert report["control"] is None and report["verdict"] in out
    assert report["run"]["accuracy_direct_baseline"] is not None
    assert (runs["rim"] / "analysis" / "report.md").read_text().startswith("# Do the memory blocks")


def test_analyze_options(runs, capsys):
    run = runs["rim"]
    assert analyze(capsys, "capture", run, "--n", N, "--attn")[0] == 0
    meta = strict_json(run / "analysis" / "capture" / "meta.json")
    assert meta["attn_layers"] == [0, 1] and meta["n"] == int(N)

    assert (
        analyze(
            capsys, "ablate", run, "--n", N, "--mode", "zero", "--grid", "--layers", "1", "--blocks", "2"
        )[0]
        == 0
    )
    table = load_result(run, "ablate")
    assert set(table["mode"]) == {"zero"} and (run / "analysis" / "ablate.grid.fig.json").exists()
    assert set(table.loc[table["scope"] == "cell", "layer"]) == {1}

    assert analyze(capsys, "patch", run, "--n", N, "--per-slot", "--slots", "0,2")[0] == 0
    assert set(load_result(run, "patch")["slot"]) == {0, 2}
    assert load_summary(run, "patch")["record"]["options"]["method"] == "exact"

    # Attribution patching writes beside exact patching: the same table, plus the block edges.
    assert (
        analyze(capsys, "patch", run, "--n", N, "--per-slot", "--slots", "0,2", "--method", "attribution")[0]
        == 0
    )
    estimate = load_result(run, "patch_attribution")
    assert list(estimate.columns) == list(load_result(run, "patch").columns) and set(estimate["slot"]) == {
        0,
        2,
    }
    assert load_summary(run, "patch_attribution")["record"]["options"]["method"] == "attribution"
    assert set(load_result(run, "patch_edges")["layer"]) == {0, 1}
    assert (run / "analysis" / "patch_edges.heatmap.fig.json").exists()
    code, _, err = analyze(capsys, "patch", run, "--n", N, "--method", "exact", "--backend", "tl")
    assert code == 2 and err.count("\n") == 1 and "backend hf only" in err


def test_backends_give_the_same_ablation_from_the_command_line(runs, capsys):
    run = runs["rim"]
    tables = {}
    for backend in ("hf", "tl", "nnsight"):
        assert analyze(capsys, "ablate", run, "--n", N, "--mode", "resample", "--backend", backend)[0] == 0
        tables[backend] = load_result(run, "ablate")
    for backend in ("tl", "nnsight"):
        pd.testing.assert_frame_equal(
            tables[backend].drop(columns="logprob"), tables["hf"].drop(columns="logprob"), atol=1e-5
        )


# -- errors: exit 2, one line ---------------------------------------------------------------------------
@pytest.fixture
def broken(tiny_modchain_runs, tmp_path) -> dict[str, Path]:
    return clone_runs(tiny_modchain_runs, tmp_path)


def test_error_checkpoint_without_memory_spec(broken, capsys):
    (broken["rim"] / "model" / "rim_memory.json").unlink()
    line = error_line(capsys, "ablate", broken["rim"])
    assert "no memory spec (rim_memory.json); not a rim-lens checkpoint" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["ablate", "--layers", "99"], "layer [99] out of range: layers are 0..1"),
        (["patch", "--layers", "2"], "layer [2] out of range: layers are 0..1"),
        (["ablate", "--blocks", "0"], "block [0] out of range: blocks are 1..2"),
        (["knockout", "--blocks", "3"], "block"),
        (["interchange", "--slots", "9"], "slot [9] out of range: slots are 0..2"),
        (["probe", "--layers", "99"], "layer [99] out of range: layers are 0..2"),
    ],
)
def test_error_index_out_of_range(runs, capsys, args, message):
    line = error_line(capsys, args[0], runs["rim"], "--n", N, *args[1:])
    assert message in line


def test_error_missing_artefacts(broken, tmp_path, capsys):
    (broken["rim"] / "data" / "test.jsonl").unlink()
    line = error_line(capsys, "ablate", broken["rim"])
    assert "run has no data/test.jsonl" in line
    line = error_line(capsys, "pca", broken["pause"], "--data", tmp_path / "missing.jsonl")
    assert "missing.jsonl: no such file" in line
    line = error_line(capsys, "ablate", tmp_path / "nowhere")
    assert "no such run directory" in line
    with pytest.raises(RunError, match="no patch analysis; produce it with `rim-lens analyze patch"):
        load_result(broken["pause"], "patch")
    with pytest.raises(RunError, match="no report analysis"):
        load_summary(broken["pause"], "report")


@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
@pytest.mark.parametrize("backend", ["hf", "tl", "nnsight"])
def test_error_unsupported_architecture(broken, capsys, arch, backend):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, OPTConfig

    model_dir = broken["rim"] / "model"
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    config = (
        GPTNeoXConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        if arch == "gpt_neox"
        else OPTConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=16,
        )
    )
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (model_dir / name).unlink(missing_ok=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    line = error_line(capsys, "knockout", broken["rim"], "--backend", backend)
    assert f"backend {backend}: unsupported architecture '{arch}'" in line


@pytest.mark.parametrize("what", ["ablate", "capture", "report"])
def test_error_direct_run_has_no_blocks(tiny_modchain_runs, capsys, what):
    # Fails before writing anything, so the shared run can be used as it is.
    line = error_line(capsys, what, tiny_modchain_runs["direct"])
    assert "a direct model has no memory blocks to analyse" in line
    assert not (tiny_modchain_runs["direct"] / "analysis").exists()
