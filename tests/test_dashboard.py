"""The dashboard, driven as a person would: every page through `streamlit.testing.v1.AppTest`
on a runs folder holding tiny trained runs (tests/fixtures.py `tiny_modchain_runs`: a RiM run
whose readout cannot see the question, so its answer must pass through its blocks, the pause
control and a direct baseline); analyses started from the page; missing, corrupt and escaping
paths; and the `rim-lens dashboard` command line.

What the pages show is checked against the run's own artefacts (predictions.jsonl,
metrics.json, report.json), not against accuracies the tiny models may or may not reach.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures import clone_runs
from streamlit.testing.v1 import AppTest

from dashboards import core
from dashboards.views import PAGES
from rim_lens.cli import main
from rim_lens.data.tasks.base import Task
from rim_lens.data.tasks.modchain import ModChain

torch.set_num_threads(1)

APP = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"


# -- fixtures and helpers ------------------------------------------------------------------------
def runs_folder(family: dict[str, Path], dest: Path) -> Path:
    """A writable runs folder `dest` holding the family as demo/{rim,pause,direct} (+ data/)."""
    copy = clone_runs(family, dest)
    shutil.move(copy["rim"].parent, dest / "demo")
    return dest


@pytest.fixture(scope="module")
def sample_root(tiny_modchain_runs, tmp_path_factory) -> Path:
    """Runs folder for the tests that only read."""
    return runs_folder(tiny_modchain_runs, tmp_path_factory.mktemp("dashboard") / "runs")


@pytest.fixture
def fresh_root(tiny_modchain_runs, tmp_path) -> Path:
    """Runs folder for a test that writes into it (analyses, sweeps)."""
    return runs_folder(tiny_modchain_runs, tmp_path / "runs")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def open_app(monkeypatch, root: Path | str, page: str | None = None) -> AppTest:
    monkeypatch.setenv(core.ENV_RUNS, str(root))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    if page is not None:
        go_to(at, page)
    assert_no_exception(at)
    return at


def go_to(at: AppTest, page: str) -> AppTest:
    """Open the page titled `page` (its own URL, as a click in the sidebar's navigation does)."""
    return at.switch_page(f"routes/{PAGES[page][0]}.py").run()


def assert_no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    text = shown(at)
    assert "Traceback" not in text, text


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures on the page by title."""
    out = {}
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        title = (spec["layout"].get("title") or {}).get("text", "")
        out[title if title not in out else f"{title} #2"] = spec
    return out


def array(x) -> list:
    """A plotly JSON array as a list: plotly 6 writes numeric arrays as base64 (`bdata`)."""
    if isinstance(x, dict) and "bdata" in x:
        import base64

        import numpy as np

        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])
        return (
            a.reshape([int(n) for n in str(x["shape"]).split(",")]).tolist() if "shape" in x else a.tolist()
        )
    return x


def chart(at: AppTest, startswith: str) -> dict:
    found = [spec for title, spec in charts(at).items() if title.startswith(startswith)]
    assert found, f"no chart titled {startswith!r}; charts: {list(charts(at))}"
    return found[0]


def shown(at: AppTest) -> str:
    """Every message, markdown, caption and code block on the page, one per line."""
    parts = []
    for kind in ("error", "warning", "info", "success", "markdown", "caption", "code", "header", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [str(e.value) for e in at.sidebar.error] + [str(e.value) for e in at.sidebar.warning]
    return "\n".join(parts)


def messages(at: AppTest, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


# -- Navigation ----------------------------------------------------------------------------------
def test_every_page_has_its_own_url(monkeypatch, sample_root):
    """st.navigation serves each page at its own path (the first at /): opening one by its script
    shows that page's header and no other's."""
    headers = {"Runs": "Runs", "Memory explorer": "Memory explorer", "Probes": "Probes",
               "Causal": "Causal tests", "Playground": "Playground"}  # fmt: skip
    assert list(PAGES) == list(headers) and len({path for path, _ in PAGES.values()}) == len(PAGES)
    at = open_app(monkeypatch, sample_root)
    assert [h.value for h in at.header][:1] == ["Runs"]  # the default page
    for title, start in headers.items():
        go_to(at, title)
        assert_no_exception(at)
        assert [h.value.startswith(start) for h in at.header] == [True], (title, [h.value for h in at.header])


# -- Runs ----------------------------------------------------------------------------------------
def test_runs_page_lists_runs_training_and_evaluation(monkeypatch, fresh_root):
    root = fresh_root
    metrics = {
        m: json.loads((root / "demo" / m / "metrics.json").read_text()) for m in ("direct", "pause", "rim")
    }
    at = open_app(monkeypatch, root, "Runs")
    table = at.dataframe[0].value
    assert list(table["run"]) == ["demo/direct", "demo/pause", "demo/rim"]
    assert list(table["method"]) == ["direct", "pause", "rim"]
    assert set(table["task"]) == {"modchain"} and set(table["status"]) == {"completed"}
    assert set(table["model"]) == {"gpt2 tiny (2 layers, width 64)"}
    assert table.set_index("run").loc["demo/rim", "K"] == 2
    assert list(table["accuracy"]) == pytest.approx(
        [metrics[m]["accuracy"] for m in ("direct", "pause", "rim")]
    )

    # The RiM run is shown first: loss per stage and stage-1 readout accuracy per step.
    assert at.selectbox(key="runs.run").value == "demo/rim"
    loss = chart(at, "Training loss per stage: demo/rim")
    assert [t["name"] for t in loss["data"]] == ["grounding", "refinement"]
    grounding = chart(at, "Held-out readout accuracy during grounding")
    assert {"step_1", "answer"} <= {t["name"] for t in grounding["data"]}

    # Evaluation against the baselines beside it, as metrics.json has it.
    evaluation = at.dataframe[1].value.set_index("method")
    assert list(evaluation.index) == ["direct", "pause", "rim"]
    for m in ("direct", "pause", "rim"):
        assert evaluation.loc[m, "accuracy"] == pytest.approx(metrics[m]["accuracy"])
        assert evaluation.loc[m, "answer_tokens"] == pytest.approx(metrics[m]["answer_tokens_mean"])
    assert evaluation.loc["rim", "any_block_accuracy"] == pytest.approx(metrics["rim"]["any_block_accuracy"])
    assert evaluation.loc["direct", "ttft_vs_direct"] == pytest.approx(1.0)
    assert evaluation.loc["rim", "latency_vs_direct"] == pytest.approx(
        metrics["rim"]["latency_ms"] / metrics["direct"]["latency_ms"]
    )
    per_block = chart(at, "Accuracy of the readout after each block")
    assert {t["name"] for t in per_block["data"]} == {"rim", "pause", "direct (no blocks)"}
    rim_line = next(t for t in per_block["data"] if t["name"] == "rim")
    assert array(rim_line["y"]) == pytest.approx(metrics["rim"]["per_block_accuracy"])
    chart(at, "Held-out exact-match accuracy")

    # No sweep yet: the exact command to produce it.
    rim = f"{root}/demo/rim"
    assert f"rim-lens eval {rim} --K 1,2,4,8" in messages(at, "code")
    assert not [t for t in charts(at) if t.startswith("Memory budget")]

    # Choosing another run changes what is shown.
    at.selectbox(key="runs.run").set_value("demo/direct").run()
    assert_no_exception(at)
    assert [t["name"] for t in chart(at, "Training loss per stage: demo/direct")["data"]] == ["train"]
    assert "has no memory blocks" in messages(at, "info")

    # After the sweep the budget view plots it.
    assert main(["eval", rim, "--K", "1,3"]) == 0
    at.selectbox(key="runs.run").set_value("demo/rim").run()
    assert_no_exception(at)
    budget = chart(at, "Memory budget")
    assert sorted(x for t in budget["data"] for x in array(t["x"])) == [1, 3]


# -- Memory explorer -----------------------------------------------------------------------------
def test_memory_explorer_example_tokens_readouts_states(monkeypatch, fresh_root):
    root = fresh_root
    examples = jsonl(root / "demo/rim/data/test.jsonl")
    predictions = jsonl(root / "demo/rim/predictions.jsonl")
    at = open_app(monkeypatch, root, "Memory explorer")
    assert at.selectbox(key="explorer.run").value == "demo/rim"
    assert f"`{examples[0]['question']}`" in messages(at, "markdown")

    tokens = chart(at, "Inference prompt")
    text = tokens["data"][0]["text"][0]
    # K = 2 blocks of <b> <m> </b>; memory tokens are escaped, so plotly shows "<b>" instead of
    # reading it as bold markup.
    assert text.count("&lt;b&gt;") == 2 and text.count("&lt;/b&gt;") == 2 and text.count("&lt;m&gt;") == 2
    assert text[-1] == "####"
    assert {t["name"] for t in tokens["data"][1:]} == {
        "question",
        "block begin",
        "memory",
        "block end",
        "readout",
    }

    # The readout after every block: the same as `rim-lens eval` recorded.
    readouts = at.dataframe[0].value
    assert list(readouts["block"]) == [1, 2]
    assert list(readouts["readout"]) == predictions[0]["per_block"]
    assert list(readouts["correct"]) == predictions[0]["per_block_correct"]

    norm_mean = array(chart(at, "State norm")["data"][0]["z"])
    assert len(norm_mean) == 3 and len(norm_mean[0]) == 2  # layers 0..2 x blocks 1..2
    chart(at, "Logit lens at slot &lt;/b&gt;")

    # A widget changes what is shown: the example, and the slot of the heat maps.
    other = next(
        i for i, ex in enumerate(examples) if ex["question"].count(" ") != examples[0]["question"].count(" ")
    )
    at.selectbox(key="explorer.example").set_value(other).run()
    assert_no_exception(at)
    assert f"`{examples[other]['question']}`" in messages(at, "markdown")
    assert chart(at, "Inference prompt")["data"][0]["text"][0] != text
    assert list(at.dataframe[0].value["readout"]) == predictions[other]["per_block"]
    norm_other = array(chart(at, "State norm")["data"][0]["z"])
    at.selectbox(key="explorer.slot").set_value("<b>").run()
    assert array(chart(at, "State norm")["data"][0]["z"]) != norm_other
    assert chart(at, "Logit lens at slot &lt;b&gt;")

    # No capture yet: the command, and a button that makes one; then the PCA views.
    rim = f"{root}/demo/rim"
    assert f"rim-lens analyze capture {rim}" in messages(at, "code")
    assert not [t for t in charts(at) if t.startswith("PC1")]
    at.button(key="capture.go.demo/rim").click().run()
    assert_no_exception(at)
    assert (root / "demo/rim/analysis/capture/meta.json").exists()
    pc1 = chart(at, "PC1 of this example's states")
    assert len(array(pc1["data"][0]["z"])) == 3
    trajectory = chart(at, "Block states in PCA space (layer 2)")
    assert "example shown" in {t["name"] for t in trajectory["data"]}
    at.select_slider(key="explorer.pca_layer").set_value(1).run()
    chart(at, "Block states in PCA space (layer 1)")

    # A typed question the task can parse, and one it cannot.
    at.radio(key="explorer.source").set_value("type a question").run()
    at.text_input(key="explorer.question").input("7 *1 +0 -0 mod 10").run()
    assert_no_exception(at)
    assert "`7 *1 +0 -0 mod 10`" in messages(at, "markdown")
    typed = at.dataframe[0].value
    assert list(typed["block"]) == [1, 2] and list(typed["correct"]) == [r == "7" for r in typed["readout"]]
    at.text_input(key="explorer.question").input("what is seven").run()
    assert_no_exception(at)
    assert "cannot read this question" in messages(at, "warning")
    # A task that cannot compute an example from its question (GSM8K, ProsQA) says so.
    monkeypatch.setattr(ModChain, "parse_question", Task.parse_question)
    at.text_input(key="explorer.question").input("7 *1 +0 +0 mod 10").run()
    assert_no_exception(at)
    assert "can't parse typed questions" in messages(at, "warning")


# -- Playground ----------------------------------------------------------------------------------
def run_intervention(at: AppTest, example: int) -> tuple[dict, pd.DataFrame]:
    at.selectbox(key="play.example").set_value(example).run()
    at.button(key="play.go").click().run()
    assert_no_exception(at)
    return {m.label: m.value for m in at.metric}, at.dataframe[0].value


def test_playground_ablation_changes_the_prediction(monkeypatch, sample_root):
    examples = jsonl(sample_root / "demo/rim/data/test.jsonl")
    predicted = [p["prediction"] for p in jsonl(sample_root / "demo/rim/predictions.jsonl")]
    at = open_app(monkeypatch, sample_root, "Playground")
    assert at.selectbox(key="play.run").value == "demo/rim"
    assert "Press **Run intervention**" in messages(at, "info")

    # Zero every block state at every layer. This RiM's readout cannot see the question, so
    # its answer can only come from the blocks: without them it answers the same for any two
    # questions of one length (the same positions), so it changes for at least one of them.
    same_length = lambda a, b: len(examples[a]["question"].split()) == len(examples[b]["question"].split())  # noqa: E731
    i = 0
    j = next(x for x in range(len(examples)) if predicted[x] != predicted[i] and same_length(x, i))
    at.selectbox(key="play.mode").set_value("zero")
    answers = {}
    for x in (i, j):
        metrics, table = run_intervention(at, x)
        assert metrics["gold answer"] == examples[x]["answer"] and metrics["answer, intact"] == predicted[x]
        assert list(table["readout_before"].iloc[-1:]) == [predicted[x]]
        answers[x] = (metrics["answer under zero"], table)
    assert answers[i][0] == answers[j][0], "without its blocks the answer no longer depends on the question"
    changed = i if answers[i][0] != predicted[i] else j
    assert answers[changed][0] != predicted[changed]
    metrics, table = run_intervention(at, changed)
    assert "the final answer changed" in messages(at, "success")
    assert (
        bool(table["changed"].iloc[-1]) and table["logprob_after"].iloc[-1] < table["logprob_before"].iloc[-1]
    )
    effect = chart(at, "Readout after each block: intact vs intervened")
    assert [t["name"] for t in effect["data"]] == ["intact", "intervened"]
    block1_blind = table.loc[0, "readout_after"]

    # Changing a setting invalidates the shown result until the button is pressed again.
    at.multiselect(key="play.blocks").set_value([1]).run()
    assert "Press **Run intervention**" in messages(at, "info") and not at.metric
    at.button(key="play.go").click().run()
    # The readout after block 1 sees block 1 only: zeroing block 1 alone blinds it the same way.
    assert at.dataframe[0].value.loc[0, "readout_after"] == block1_blind

    # Patching every block from an example whose question has the same length (the same
    # positions) gives this example exactly the donor's answer: the readout sees only blocks.
    donor = next(
        x for x in range(len(examples)) if predicted[x] != predicted[changed] and same_length(x, changed)
    )
    at.multiselect(key="play.blocks").set_value([1, 2])
    at.radio(key="play.kind").set_value("patch from another example").run()
    at.selectbox(key="play.donor").set_value(donor)
    metrics, _ = run_intervention(at, changed)
    assert metrics["answer under patch"] == predicted[donor]

    # Mean and resample ablations of block 1 at every layer run too (donors: other held-out examples).
    at.radio(key="play.kind").set_value("ablate").run()
    at.multiselect(key="play.blocks").set_value([1])
    for mode in ("mean", "resample"):
        at.selectbox(key="play.mode").set_value(mode)
        at.button(key="play.go").click().run()
        assert_no_exception(at)
        table = at.dataframe[0].value
        assert list(table["block"]) == [1, 2] and table["logprob_after"].notna().all()
        assert f"answer under {mode}" in {m.label for m in at.metric}

    # Nothing selected: nothing to run.
    at.multiselect(key="play.slots").set_value([]).run()
    assert "Choose at least one block, one layer and one slot." in messages(at, "info")


# -- Probes and Causal (the report started from the page) ------------------------------------------
def test_causal_report_from_the_page_then_probes(monkeypatch, fresh_root):
    root = fresh_root
    rim, pause = f"{root}/demo/rim", f"{root}/demo/pause"
    at = open_app(monkeypatch, root, "Causal")
    assert f"rim-lens analyze report {rim}" in messages(at, "code")
    assert f"rim-lens analyze ablate {rim}" in messages(at, "code")
    assert f"rim-lens analyze ablate {pause}" in messages(at, "code"), "the control's tables are its own"
    assert not charts(at)

    at.number_input(key="report.n.demo/rim").set_value(48)
    at.button(key="report.go.demo/rim").click().run(timeout=600)  # the whole report, on a shared machine
    assert_no_exception(at)
    report = json.loads((root / "demo/rim/analysis/report.json").read_text())
    assert (root / "demo/pause/analysis/ablate.parquet").exists()
    card = at.dataframe[0].value.set_index("metric")
    assert list(card.columns) == ["rim", "control: pause", "how it is measured"]
    assert card.loc["examples", "rim"] == "48"
    for label, key in (
        ("accuracy, blocks intact", "accuracy_intact"),
        ("accuracy, every block mean-ablated", "accuracy_all_blocks_ablated"),
    ):
        for column, which in (("rim", "run"), ("control: pause", "control")):
            e = report[which][key]
            assert card.loc[label, column] == f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"
        assert card.loc[label, "how it is measured"]
    for line in report["verdict"].splitlines():
        assert line in messages(at, "markdown")
    # The verdict as four findings: outcome, detail, and the run's and control's intervals.
    subheaders = messages(at, "subheader")
    verdicts = at.dataframe[1].value.set_index("finding")
    for finding in report["findings"]:
        assert f"{finding['name'].capitalize()}: {finding['outcome']}" in subheaders
        assert finding["detail"] in messages(at, "info") + messages(at, "success") + messages(at, "warning")
        # Beside each verdict, what its test detects on planted models (here: not calibrated).
        assert verdicts.loc[finding["name"], "its test on planted models at this n"] == "not calibrated"
        assert "Its test on planted models: not calibrated" in messages(at, "caption")
        intervals = chart(at, f"{finding['name'].capitalize()}: ")
        if finding["run"]:
            labels = set(intervals["data"][0]["x"])
            assert {f"run: {k}" for k in finding["run"]} <= labels
            assert {f"control: {k}" for k in finding["control"]} <= labels
    titles = list(charts(at))
    for name in ("Mean ablation of block states", "Patching: recovery", "Attention knockout", "Interchange"):
        # the run and its control side by side
        assert any(t.startswith(name) and t.endswith("<sup>rim: demo/rim</sup>") for t in titles), titles
        assert any(t.startswith(name) and t.endswith("<sup>control: demo/pause</sup>") for t in titles), (
            titles
        )
    # Attribution patching beside exact patching: its estimate, the cells ranked by both, the edges.
    for name in ("Attribution patching: estimated recovery", "Exact vs attribution", "Edge attribution"):
        assert any(t.startswith(name) for t in titles), (name, titles)
    assert "Agreement with exact patching (Spearman over cells" in messages(at, "caption")

    # The variables finding: a heat map of IIA per variable for the run; the control was tested
    # at the run's best sites only (no map), and the page says how to make its map.
    variables = [v for v in report["run"]["variables"] if report["run"]["variables"][v]["site"]]
    for variable in variables:
        assert any(
            t.startswith(f"{variable}: interchange-intervention accuracy")
            and t.endswith("<sup>rim: demo/rim</sup>")
            for t in titles
        ), titles
    assert f"rim-lens analyze abstraction {pause}" in messages(at, "code")

    go_to(at, "Probes")
    assert_no_exception(at)
    correctness = root / "demo/rim/analysis/probe_correctness.parquet"
    fitted = pd.read_parquet(correctness)["auroc"].notna().any()
    assert bool([t for t in charts(at) if t.startswith("Correctness probe AUROC")]) == fitted
    if not fitted:  # every readout right (or every one wrong): nothing to separate
        assert "No correctness probe could be fitted" in messages(at, "info")
    step1 = chart(at, "Step 1 (value) probe score")
    at.selectbox(key="probes.step").set_value(2).run()
    chart(at, "Step 2 (value) probe score")
    at.radio(key="probes.metric").set_value("selectivity").run()
    assert array(chart(at, "Step 2 (value) probe selectivity")["data"][0]["z"]) != array(
        step1["data"][0]["z"]
    )
    chart(at, "Value probes at layer")

    # Probe-based answer selection, as analysis/probe_values.json records it.
    summary_path = root / "demo/rim/analysis/probe_values.json"
    summary = json.loads(summary_path.read_text())
    summary["selection"] = {
        "layer": 2,
        "n": 48,
        "n_any": 40,
        "selected": 0.75,
        "final_block": 0.5,
        "random_block": 0.4,
        "any_block": 0.8,
        "selected_when_any": 0.9,
        "final_block_when_any": 0.6,
        "random_block_when_any": 0.5,
    }
    summary_path.write_text(json.dumps(summary))
    table = pd.read_parquet(correctness)
    table["auroc"] = 0.5 + 0.1 * table["layer"]  # as if some readouts had been wrong
    table.to_parquet(correctness)
    at.run()
    assert_no_exception(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["probe-selected block"] == "75.0%" and metrics["any block (oracle)"] == "80.0%"
    assert array(chart(at, "Correctness probe AUROC")["data"][0]["z"])[2][0] == pytest.approx(0.7)


# -- missing and corrupt artefacts ---------------------------------------------------------------
def test_missing_and_corrupt_artefacts_name_the_fix(monkeypatch, sample_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(sample_root / "demo" / "direct", root / "x" / "failed")
    (root / "x" / "failed" / "status.json").write_text(
        json.dumps({"status": "failed", "error": "DataError: boom"})
    )
    (root / "x" / "failed" / "metrics.json").unlink()
    broken = root / "x" / "broken"
    shutil.copytree(sample_root / "demo" / "rim", broken)
    (broken / "metrics.json").write_text("{not json")
    (broken / "train_log.jsonl").unlink()
    (broken / "analysis").mkdir()
    (broken / "analysis" / "ablate.parquet").write_bytes(b"garbage")
    (broken / "analysis" / "report.json").write_text("[1, 2")

    at = open_app(monkeypatch, root, "Runs")
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["x/failed", "status"] == "failed" and "DataError: boom" in table.loc["x/failed", "error"]
    assert "corrupt JSON" in table.loc["x/broken", "error"]
    assert at.selectbox(key="runs.run").value == "x/broken"
    assert "rim-lens train RECIPE" in messages(at, "code")  # no training log
    assert "corrupt JSON" in messages(at, "warning") and f"rim-lens eval {root}/x/broken" in messages(
        at, "warning"
    )
    at.selectbox(key="runs.run").set_value("x/failed").run()
    assert_no_exception(at)
    assert "status **failed**: DataError: boom" in messages(at, "error")

    go_to(at, "Causal")
    assert_no_exception(at)
    warnings = messages(at, "warning")
    assert "report.json: corrupt JSON" in warnings and f"rim-lens analyze report {root}/x/broken" in warnings
    assert (
        "ablate.parquet: corrupt table" in warnings and f"rim-lens analyze ablate {root}/x/broken" in warnings
    )

    # A run without its model: the pages that need it say so and how to make one.
    shutil.rmtree(broken / "model")
    (root / "x" / "failed" / "model" / "config.json").unlink()
    at = open_app(monkeypatch, root, "Playground")
    assert "no model" in messages(at, "warning") and "rim-lens train RECIPE" in messages(at, "warning")


# -- bad input -----------------------------------------------------------------------------------
def test_runs_directory_missing_or_empty(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "nowhere")
    assert "does not exist" in messages(at, "error")
    assert f"rim-lens demo --runs-dir {tmp_path / 'nowhere'}/demo" in messages(at, "code")
    (tmp_path / "empty" / "just-a-folder").mkdir(parents=True)
    at = open_app(monkeypatch, tmp_path / "empty", "Causal")
    assert "No runs under" in messages(at, "warning")


def test_paths_outside_the_root_are_refused(monkeypatch, sample_root, tmp_path):
    root = tmp_path / "inside"
    shutil.copytree(sample_root / "demo" / "rim", root / "ok" / "rim")
    shutil.copytree(sample_root / "demo" / "rim", root / "leaky" / "rim")
    secret = tmp_path / "secret.jsonl"
    shutil.copy(root / "leaky" / "rim" / "data" / "test.jsonl", secret)
    (root / "leaky" / "rim" / "data" / "test.jsonl").unlink()
    (root / "leaky" / "rim" / "data" / "test.jsonl").symlink_to(secret)  # a file linking outside the root
    (root / "escape").symlink_to(
        sample_root / "demo" / "rim", target_is_directory=True
    )  # a run linking outside

    at = open_app(monkeypatch, root, "Runs")
    assert list(at.dataframe[0].value["run"]) == ["leaky/rim", "ok/rim"], (
        "the link leading outside is not listed"
    )
    sidebar = messages(at.sidebar, "warning")
    assert "escape: a link to" in sidebar and "outside the runs root; ignored" in sidebar

    outside = sample_root / "demo" / "rim"
    for typed in (
        os.path.relpath(outside, root),
        "escape",
        str(outside),
        "ok/../../secret.jsonl",
        "leaky/rim",
    ):
        at.sidebar.text_input(key="run_path").input(typed).run()
        assert_no_exception(at)
        assert "Refused" in messages(at, "error") and "outside the runs root" in messages(at, "error"), typed
        assert at.selectbox(key="runs.run").value == "leaky/rim"  # nothing was opened

    # A path inside the root opens that run.
    at.sidebar.text_input(key="run_path").input("ok/rim").run()
    assert_no_exception(at)
    assert not at.error and at.selectbox(key="runs.run").value == "ok/rim"

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = "../../etc"
    at.run()
    assert "Refused" in messages(at, "error")

    # Picked from the list, the run whose file links outside is refused when its files are read.
    at = open_app(monkeypatch, root, "Memory explorer")
    assert at.selectbox(key="explorer.run").value == "leaky/rim"
    assert "refused, a link to" in messages(at, "warning") and "test.jsonl" in messages(at, "warning")
    at.selectbox(key="explorer.run").set_value("ok/rim").run()
    assert_no_exception(at)
    assert not at.main.warning, messages(at.main, "warning")
    chart(at, "Inference prompt")


# -- the command line ----------------------------------------------------------------------------
class Launched(Exception):
    pass


def test_dashboard_command_starts_streamlit_on_the_app(monkeypatch, tmp_path, capsys):
    launched = []

    def fake_exec(path, argv):
        launched.append(argv)
        raise Launched

    monkeypatch.setattr(os, "execv", fake_exec)
    with pytest.raises(Launched):
        main(["dashboard", str(tmp_path), "--port", "8765", "--host", "0.0.0.0", "--allow-remote"])
    argv = launched[-1]
    assert argv[1:4] == ["-m", "streamlit", "run"] and Path(argv[4]) == APP
    flags = argv[5 : argv.index("--")]
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert (
        pairs["--server.headless"] == "true"
        and pairs["--server.address"] == "0.0.0.0"
        and pairs["--server.port"] == "8765"
    )
    # A remote dashboard is read-only unless --allow-actions.
    assert argv[argv.index("--") + 1 :] == ["--runs", str(tmp_path), "--read-only"]
    assert core.runs_argument(argv[argv.index("--") + 1 :]) == str(tmp_path)
    assert core.read_only_argument(argv[argv.index("--") + 1 :])

    with pytest.raises(Launched):
        main(["dashboard"])
    argv = launched[-1]
    assert argv[-2:] == ["--runs", "runs"] and "127.0.0.1" in argv and "8501" in argv
    assert "does not exist yet" in capsys.readouterr().err or Path("runs").is_dir()

    assert main(["dashboard", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_a_read_only_dashboard_starts_no_analysis(monkeypatch, sample_root):
    """`rim-lens dashboard` served beyond this machine without --allow-actions passes --read-only:
    the buttons that run and save analyses are disabled and say why."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--read-only"])
    at = open_app(monkeypatch, sample_root, "Causal")
    button = at.button(key="report.go.demo/rim")
    assert button.disabled and "Read-only dashboard" in messages(at, "caption")
    monkeypatch.setattr(sys, "argv", ["app.py"])
    assert not open_app(monkeypatch, sample_root, "Causal").button(key="report.go.demo/rim").disabled


def test_one_malformed_run_does_not_hide_the_others(monkeypatch, sample_root, tmp_path):
    """A config that is no mapping, metrics that are a list: every run is listed, the readable
    ones in full, and the page names each run whose files cannot be read and why."""
    root = tmp_path / "runs"
    shutil.copytree(sample_root / "demo", root / "demo")
    (root / "demo" / "pause" / "config.yaml").write_text("- a list\n- not a recipe\n")
    (root / "demo" / "direct" / "metrics.json").write_text("[1, 2]")
    at = open_app(monkeypatch, root, "Runs")
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == {"demo/rim", "demo/pause", "demo/direct"}
    assert table.loc["demo/rim", "readable"] and table.loc["demo/rim", "accuracy"] is not None
    assert not table.loc["demo/pause", "readable"] and not table.loc["demo/direct", "readable"]
    warnings = messages(at, "warning")
    assert "Run demo/pause: some of its files cannot be read" in warnings
    assert "pause/config.yaml: expected a mapping, got list" in warnings
    assert "Run demo/direct: some of its files cannot be read" in warnings
    assert "direct/metrics.json: expected a mapping, got list" in warnings
