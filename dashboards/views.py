"""The dashboard's pages: Runs, Memory explorer, Probes, Causal, Playground.

Each page is a function of the context (runs root, runs found, a run picked by path). Figures come
from `rim_lens.analysis.figures`; models and arrays are cached in `dashboards.core` and below.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import core
from dashboards.core import Root, RunInfo, command, missing, section
from rim_lens.analysis import figures
from rim_lens.errors import RimLensError, RunError

ROLE_NAMES = {0: "pad", 1: "question", 2: "block begin", 3: "memory", 4: "block end", 5: "readout"}
MEAN_SLOT = "mean over slots"


@dataclass
class Context:
    root: Root
    runs: list[RunInfo]
    picked: RunInfo | None = None  # a run named by path (sidebar or ?run=)

    def block_runs(self) -> list[RunInfo]:
        runs = [r for r in self.runs if core.uses_blocks(self.root, r)]
        if self.picked is not None and self.picked not in runs and core.uses_blocks(self.root, self.picked):
            runs.insert(0, self.picked)
        return runs


def chart(fig, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


def choose(
    ctx: Context, candidates: list[RunInfo], key: str, label: str = "Run", prefer: str = "rim"
) -> RunInfo | None:
    """A run picker over `candidates`; the run named by path (if any) comes first, else one
    called `prefer`."""
    if not candidates:
        st.warning(
            f"No run with memory blocks (rim or pause) under {ctx.root.shown}. Train RiM and its baselines with:"
        )
        command(f"rim-lens demo --runs-dir {ctx.root.shown}/demo")
        return None
    names = [r.name for r in candidates]
    if ctx.picked is not None and ctx.picked in candidates:
        index = candidates.index(ctx.picked)
        if (
            st.session_state.get(f"{key}.picked") != ctx.picked.name
        ):  # a newly named run wins over the last choice
            st.session_state[f"{key}.picked"] = st.session_state[key] = ctx.picked.name
    else:
        index = next((i for i, r in enumerate(candidates) if r.path.name == prefer), 0)
    if st.session_state.get(key) not in names:
        st.session_state.pop(key, None)  # the run it held is gone
    # With a value in the session state the index is ignored; 0 keeps Streamlit from warning about it.
    name = st.selectbox(label, names, index=index if key not in st.session_state else 0, key=key)
    return candidates[names.index(name)]


def esc(text: object) -> str:
    """Text for a plotly title or label, shown verbatim: memory tokens like <b> are not markup."""
    return html.escape(str(text), quote=False)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# == Runs ==========================================================================================
def runs_page(ctx: Context) -> None:
    st.header("Runs")
    st.caption(f"Every run under {ctx.root.path} (a run is a folder with config.yaml or model/).")
    rows = [core.run_summary(ctx.root, r) for r in ctx.runs]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

    candidates = ctx.runs if ctx.picked is None or ctx.picked in ctx.runs else [ctx.picked, *ctx.runs]
    run = choose(ctx, candidates, "runs.run")
    if run is None:
        return
    info = core.run_summary(ctx.root, run)
    status = info["status"]
    line = f"**{run.shown}** — {info['method'] or '?'} on {info['task'] or '?'}, model {info['model'] or '?'}, status **{status}**"
    (st.error if status == "failed" or "corrupt" in status else st.markdown)(
        line + (f": {info['error']}" if info["error"] else "")
    )
    if status == "unknown":
        st.caption("No status.json: the run was not started by `rim-lens train`, or predates it.")

    train_tab, eval_tab, budget_tab = st.tabs(["Training", "Evaluation", "Memory budget"])
    with train_tab, section("training log"):
        _training(ctx, run)
    with eval_tab, section("evaluation"):
        _evaluation(ctx, run)
    with budget_tab, section("memory budget"):
        _budget(ctx, run)


def _training(ctx: Context, run: RunInfo) -> None:
    log = core.read(ctx.root, run, "train_log.jsonl")
    if not log:
        missing(run, "training log (train_log.jsonl)", "rim-lens train RECIPE --runs-dir ... --name ...")
        return
    if not any("loss" in r for r in log):
        st.info(f"{run.shown}/train_log.jsonl has no loss records yet (training may have just started).")
    else:
        chart(figures.loss_curves(log, title=f"Training loss per stage: {run.name}"), key="runs.loss")
    stages = list(dict.fromkeys(r["stage"] for r in log if "readout_accuracy" in r))
    if "grounding" in stages:
        st.caption(
            "Stage 1 (grounding): held-out teacher-forced accuracy of each step readout — the go / no-go check before stage 2."
        )
    for stage in stages:
        chart(figures.readout_curves(log, stage), key=f"runs.readout.{stage}")


def _evaluation(ctx: Context, run: RunInfo) -> None:
    metrics, notes = {}, []
    for sib in core.siblings(ctx.runs, run) or [run]:
        try:
            m = core.read(ctx.root, sib, "metrics.json")
        except RunError as err:
            notes.append(str(err))
            continue
        if m is None:
            notes.append(f"{sib.shown} has no metrics.json; produce it with `rim-lens eval {sib.shown}`")
            continue
        metrics[sib.path.name] = m
    for n in notes:
        st.warning(n)
    if not metrics:
        missing(run, "evaluation (metrics.json)", f"rim-lens eval {run.shown}")
        return
    from training.demo import comparison

    st.caption(
        f"{run.shown} against the runs beside it in {core.Root.display(ctx.root, run.path.parent)}/ "
        "(latency ratios are relative to the run called `direct`)."
    )
    table = pd.DataFrame(comparison(metrics))
    st.dataframe(table, hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        chart(figures.comparison_bars(metrics), key="runs.compare")
    with right:
        chart(figures.per_block_accuracy(metrics).update_xaxes(dtick=1), key="runs.perblock")
    chance = next((m.get("chance_accuracy") for m in metrics.values() if m.get("chance_accuracy")), None)
    if chance:
        st.caption(
            f"Chance accuracy of this task: {chance:.3f}. Any-block accuracy is an oracle and rises with chance."
        )


def _budget(ctx: Context, run: RunInfo) -> None:
    if not core.uses_blocks(ctx.root, run):
        st.info(f"{run.shown} has no memory blocks, so there is no memory budget to vary.")
        return
    sweep = core.read(ctx.root, run, "sweep.json")
    if not sweep:
        missing(run, "memory-budget sweep (sweep.json)", f"rim-lens eval {run.shown} --K 1,2,4,8")
        st.caption("Add `--M 1,2,4` to vary the memory tokens per block as well.")
        return
    chart(figures.budget_sweep(sweep), key="runs.budget")
    st.dataframe(
        pd.DataFrame(sweep)[
            [c for c in ("K", "M", "accuracy", "any_block_accuracy", "n_eval") if c in sweep[0]]
        ],
        hide_index=True,
    )


# == Memory explorer ===============================================================================
def explorer_page(ctx: Context) -> None:
    st.header("Memory explorer")
    run, lab = _block_run(ctx, "explorer.run")
    if lab is None:
        return
    ex = _pick_example(lab, "explorer")
    if ex is None:
        return
    st.markdown(
        f"**Question:** `{ex.question}` — **gold answer:** `{ex.answer}`"
        + (f" — steps: `{lab.task.join_steps(ex.steps)}`" if ex.steps else "")
    )

    with section("tokens"):
        seq = lab.builder.prompt(ex)
        tokens = lab.tokenizer.convert_ids_to_tokens(seq.ids)
        chart(
            figures.token_roles(
                tokens,
                [ROLE_NAMES[r] for r in seq.roles],
                seq.blocks,
                title=f"Inference prompt: {len(tokens)} tokens, {lab.spec.K} blocks of {lab.spec.M + 2}",
            ),
            key="explorer.tokens",
        )

    with section("readouts"):
        readouts = _readouts(lab, run, ex)
        chart(figures.block_readouts(readouts), key="explorer.readouts")
        st.dataframe(readouts, hide_index=True)

    with section("block states"):
        states = _states(lab, run, ex)  # [layers 0..L, K, slots, d]
        slots = lab_slots(lab)
        slot = st.selectbox("Slot of the block", [MEAN_SLOT, *slots], index=0, key="explorer.slot")
        j = None if slot == MEAN_SLOT else slots.index(slot)
        norms = np.linalg.norm(states, axis=-1)  # [L+1, K, S]
        grid = norms.mean(-1) if j is None else norms[..., j]
        df = _grid_frame(grid, "norm")
        chart(
            figures.layer_block_heatmap(df, "norm", f"State norm, layer × block ({esc(slot)})"),
            key="explorer.norm",
        )

    with section("PCA"):
        _explorer_pca(ctx, run, lab, states, j, slot)

    with section("logit lens"):
        _explorer_lens(lab, states, j, slots)


def _load(ctx: Context, run: RunInfo):
    """The run's Lab, or None after saying why it cannot be loaded."""
    with section(f"cannot load {run.shown}"):
        return core.lab(ctx.root, run)
    return None


def _block_run(ctx: Context, key: str):
    """(run, Lab) of a run with memory blocks picked in the page, or (run or None, None) after
    saying why there is none to use."""
    run = choose(ctx, ctx.block_runs(), key)
    return run, (None if run is None else _load(ctx, run))


def lab_slots(lab) -> list[str]:
    from rim_lens.model.layouts import slot_names

    return slot_names(lab.spec)


def _grid_frame(grid: np.ndarray, value: str) -> pd.DataFrame:
    """[layers, blocks] -> long frame layer, block (1-based), value."""
    return pd.DataFrame(
        [
            {"layer": l, "block": k + 1, value: float(grid[l, k])}
            for l in range(grid.shape[0])
            for k in range(grid.shape[1])
        ]
    )


def _pick_example(lab, key: str):
    """A held-out example, or one computed from a typed question (synthetic tasks)."""
    source = st.radio(
        "Example", ["held-out example", "type a question"], horizontal=True, key=f"{key}.source"
    )
    if source == "held-out example":
        if not lab.examples:
            st.warning(f"{lab.run.path}/data/eval.jsonl holds no examples.")
            return None
        i = st.selectbox(
            "Held-out example",
            range(len(lab.examples)),
            key=f"{key}.example",
            format_func=lambda i: f"{i}: {lab.examples[i].question} → {lab.examples[i].answer}",
        )
        return lab.examples[i]
    hint = lab.examples[0].question if lab.examples else ""
    text = st.text_input("Question", value="", placeholder=hint, key=f"{key}.question")
    if not text.strip():
        st.info(f"Type a question in the task's format, e.g. `{hint}`.")
        return None
    try:
        return lab.task.parse_question(text.strip())
    except ValueError as err:
        st.warning(f"The {lab.task.name} task cannot read this question: {err}")
    except RimLensError:
        st.warning(
            f"The {lab.task.name} task can't parse typed questions (only synthetic tasks can compute an "
            "example from its question); pick a held-out example instead."
        )
    return None


@st.cache_data(show_spinner=False, max_entries=256)
def _readouts_cached(run_dir: str, model_stamp: int, question: str, answer: str, _lab) -> pd.DataFrame:
    from rim_lens.evaluation import decode_answers

    ex = _example(_lab, question, answer)
    rows = []
    for k in range(1, _lab.spec.K + 1):
        with core.model_lock(_lab):
            text = decode_answers(_lab.model, _lab.tokenizer, _lab.builder, [ex], k, max_new_tokens=32)[
                0
            ].text
        rows.append({"block": k, "readout": text, "correct": bool(_lab.task.answers_match(text, answer))})
    return pd.DataFrame(rows)


def _example(lab, question: str, answer: str):
    """The example with this question: a held-out one, else computed from the question."""
    for ex in lab.examples:
        if ex.question == question and ex.answer == answer:
            return ex
    return lab.task.parse_question(question)


def _readouts(lab, run: RunInfo, ex) -> pd.DataFrame:
    return _readouts_cached(str(run.path), core.tree_stamp(run.path / "model"), ex.question, ex.answer, lab)


@st.cache_data(show_spinner=False, max_entries=256)
def _states_cached(run_dir: str, model_stamp: int, question: str, answer: str, _lab) -> np.ndarray:
    from rim_lens.analysis.capture import block_states

    ex = _example(_lab, question, answer)
    layers = list(range(_lab.backend.n_layers + 1))
    with core.model_lock(_lab):
        return block_states(_lab.backend, _lab.builder, [ex], layers)[0][0].float().numpy()


def _states(lab, run: RunInfo, ex) -> np.ndarray:
    return _states_cached(str(run.path), core.tree_stamp(run.path / "model"), ex.question, ex.answer, lab)


@st.cache_resource(show_spinner="Fitting PCA on the run's capture…", max_entries=4)
def _capture_pca(capture_dir: str, capture_stamp: int):
    """Per captured layer, a 2-component PCA over all examples x blocks x slots (as in
    `rim_lens.analysis.pca.block_pca`) and the population's mean trajectory."""
    from sklearn.decomposition import PCA

    from rim_lens.analysis.capture import CaptureStore

    store = CaptureStore(capture_dir)
    fits, rows = {}, []
    for layer in store.layers:
        x = store.resid(layer=layer)  # [n, K, S, d]
        n, K, S, d = x.shape
        pca = PCA(2, random_state=0).fit(x.reshape(-1, d))
        z = pca.transform(x.reshape(-1, d)).reshape(n, K, S, 2).mean(0)
        fits[layer] = pca
        rows += [
            {"layer": layer, "block": k + 1, "slot": j, "pc1": float(z[k, j, 0]), "pc2": float(z[k, j, 1])}
            for k in range(K)
            for j in range(S)
        ]
    return store.meta, fits, pd.DataFrame(rows)


def _explorer_pca(ctx: Context, run: RunInfo, lab, states: np.ndarray, j: int | None, slot: str) -> None:
    capture = core.artefact(ctx.root, run, "analysis/capture/meta.json")
    if capture is None:
        missing(
            run,
            "capture of block states (analysis/capture)",
            f"rim-lens analyze capture {run.shown}",
            "the PCA is fitted on the run's captured held-out states",
        )
        _analysis_button(ctx, run, "capture", "Capture block states now")
        return
    core.check_tree(ctx.root, run.path)
    cap_dir = capture.parent
    meta, fits, trajectory = _capture_pca(str(cap_dir), core.tree_stamp(cap_dir))
    if meta["K"] != lab.spec.K or meta.get("d_model") != states.shape[-1]:
        st.warning(
            f"The capture was made with K={meta['K']}, d_model={meta.get('d_model')}, not this checkpoint's "
            f"K={lab.spec.K}, d_model={states.shape[-1]}; capture again with `rim-lens analyze capture {run.shown}`."
        )
        return
    layers = [l for l in meta["layers"] if l < states.shape[0]]
    K, S, d = states.shape[1:]
    proj = {l: fits[l].transform(states[l].reshape(-1, d)).reshape(K, S, 2) for l in layers}
    rows = []
    for l in layers:
        for k in range(K):
            z = proj[l][k].mean(0) if j is None else proj[l][k, j]
            rows.append({"layer": l, "block": k + 1, "pc1": float(z[0]), "pc2": float(z[1])})
    df = pd.DataFrame(rows)
    left, right = st.columns(2)
    with left:
        chart(
            figures.layer_block_heatmap(df, "pc1", f"PC1 of this example's states ({esc(slot)})"),
            key="explorer.pc1",
        )
    with right:
        chart(
            figures.layer_block_heatmap(df, "pc2", f"PC2 of this example's states ({esc(slot)})"),
            key="explorer.pc2",
        )
    layer = st.select_slider(
        "Layer of the PCA trajectory", options=layers, value=layers[-1], key="explorer.pca_layer"
    )
    mine = pd.DataFrame(
        [
            {
                "layer": layer,
                "block": k + 1,
                "slot": s,
                "example": "shown",
                "pc1": float(proj[layer][k, s, 0]),
                "pc2": float(proj[layer][k, s, 1]),
            }
            for k in range(K)
            for s in range(S)
            if j is None or s == j
        ]
    )
    traj = trajectory if j is None else trajectory[trajectory["slot"] == j]
    chart(figures.pca_trajectories(traj, mine, layer=layer), key="explorer.trajectory")
    st.caption(
        f"PCA fitted on {meta['n']} captured held-out examples; solid lines: the population's mean path, "
        "dotted: this example."
    )


def _explorer_lens(lab, states: np.ndarray, j: int | None, slots: list[str]) -> None:
    import torch

    from rim_lens.analysis.lens import unembedding

    j = len(slots) - 1 if j is None else j
    read = unembedding(lab.model)
    with torch.no_grad():
        probs = torch.softmax(
            read(torch.from_numpy(np.ascontiguousarray(states[:, :, j]))).float(), -1
        )  # [L+1, K, V]
    p, ids = probs.max(-1)
    rows = [
        {
            "layer": l,
            "block": k + 1,
            "slot": j,
            "lens": "logit",
            "rank": 1,
            "token_id": int(ids[l, k]),
            "token": esc(lab.tokenizer.decode([int(ids[l, k])])),
            "prob": float(p[l, k]),
        }
        for l in range(states.shape[0])
        for k in range(states.shape[1])
    ]
    fig = figures.lens_top_tokens(pd.DataFrame(rows))
    fig.update_layout(
        title=f"Logit lens at slot {esc(slots[j])} of every block: top token and its probability"
    )
    chart(fig, key="explorer.lens")


def _analysis_button(ctx: Context, run: RunInfo, what: str, label: str) -> None:
    """A button that runs `rim_lens.analysis.analyses.run_<what>` on the run's held-out set (writes analysis/)."""
    n = st.number_input(
        "Held-out examples to use", min_value=8, max_value=5000, value=200, step=8, key=f"{what}.n.{run.name}"
    )
    if st.button(label, key=f"{what}.go.{run.name}"):
        from rim_lens.analysis import analyses
        from rim_lens.analysis.lab import Lab

        with (
            section(f"rim-lens analyze {what}"),
            st.spinner(f"Running `rim-lens analyze {what} {run.shown} --n {n}`…"),
        ):
            core.check_tree(ctx.root, run.path)
            lab = Lab.open(run.path, backend="hf", n=int(n))
            getattr(analyses, f"run_{what}")(lab)
            st.success(f"Wrote {run.shown}/analysis/.")
            st.rerun()


# == Probes ========================================================================================
def probes_page(ctx: Context) -> None:
    st.header("Probes")
    run = choose(ctx, ctx.block_runs(), "probes.run")
    if run is None:
        return
    with section("probe tables"):
        corr = core.read(ctx.root, run, "analysis/probe_correctness.parquet")
        values = core.read(ctx.root, run, "analysis/probe_values.parquet")
        summary = core.read(ctx.root, run, "analysis/probe_values.json") or {}
        if corr is None and values is None:
            missing(run, "probe results (analysis/probe_*.parquet)", f"rim-lens analyze probe {run.shown}")
            _analysis_button(ctx, run, "probe", "Run probes now")
            return
        if corr is not None:
            st.subheader("Does a block know whether its readout is right?")
            notes = list(corr["note"].dropna().loc[lambda s: s != ""].unique()) if "note" in corr else []
            if corr["auroc"].notna().any():
                chart(
                    figures.layer_block_heatmap(
                        corr, "auroc", "Correctness probe AUROC (0.5 = chance)", zmid=0.5
                    ),
                    key="probes.auroc",
                )
                for note in notes[:5]:
                    st.caption(note)
            else:
                st.info(
                    "No correctness probe could be fitted: "
                    + "; ".join(notes[:5] or ["no block has both right and wrong readouts"])
                )
        else:
            missing(
                run,
                "correctness probes (analysis/probe_correctness.parquet)",
                f"rim-lens analyze probe {run.shown}",
            )
        if values is not None and len(values):
            _value_probes(values)
        _selection(summary.get("selection"))


def _value_probes(values: pd.DataFrame) -> None:
    st.subheader("Which block holds which step's value?")
    steps = sorted(int(s) for s in values["step"].dropna().unique())
    left, right = st.columns(2)
    with left:
        step = st.selectbox("Value target (step t)", steps, key="probes.step")
    with right:
        metric = st.radio("Show", ["score", "selectivity", "control"], horizontal=True, key="probes.metric")
    part = values[values["step"] == step]
    target = part["target"].dropna().iloc[0] if "target" in part and part["target"].notna().any() else "value"
    if part["score"].notna().any():
        chart(
            figures.layer_block_heatmap(
                part,
                metric,
                f"Step {step} ({target}) probe {metric}, layer × block",
                zmid=0.0 if metric == "selectivity" else None,
            ),
            key="probes.values",
        )
    else:
        st.info(f"No probe could be fitted for step {step}: {'; '.join(part['note'].dropna().unique())}")
    fitted = values.dropna(subset=["score"])
    if fitted.empty:
        return
    layers = sorted(int(l) for l in fitted["layer"].unique())
    best = int(fitted.groupby("layer")["selectivity"].mean().idxmax())
    layer = st.selectbox(
        "Layer for the step × block views", layers, index=layers.index(best), key="probes.layer"
    )
    left, right = st.columns(2)
    with left:
        chart(figures.value_probe_heatmap(values, layer=layer), key="probes.diag")
    with right:
        chart(figures.probe_curves(values, layer=layer).update_xaxes(dtick=1), key="probes.curves")


def _selection(selection: dict | None) -> None:
    st.subheader("Choosing the answer by probe confidence")
    if not selection:
        st.caption(
            'No probe-based answer selection recorded (analysis/probe_values.json has no "selection").'
        )
        return
    cols = st.columns(4)
    cols[0].metric("probe-selected block", _pct(selection.get("selected")))
    cols[1].metric("final block", _pct(selection.get("final_block")))
    cols[2].metric("random block", _pct(selection.get("random_block")))
    cols[3].metric("any block (oracle)", _pct(selection.get("any_block")))
    st.caption(
        f"On the {selection.get('n_any')} examples where some block is right: probe-selected "
        f"{_pct(selection.get('selected_when_any'))}, final block {_pct(selection.get('final_block_when_any'))} "
        f"(probe at layer {selection.get('layer')}, {selection.get('n')} examples)."
    )


# == Causal ========================================================================================
CARD_ROWS = [
    ("accuracy_intact", "accuracy, blocks intact"),
    ("accuracy_all_blocks_ablated", "accuracy, all blocks mean-ablated"),
    ("accuracy_answer_sees_no_block", "accuracy, answer sees no block"),
    ("accuracy_direct_baseline", "direct-answer baseline"),
    ("interchange_transfer_rate", "interchange: output becomes the donor's answer"),
    ("patching_peak", "patching: peak recovery"),
    ("best_value_probe_selectivity", "best value-probe selectivity"),
    ("correctness_probe_auroc", "correctness-probe AUROC"),
    ("chance_accuracy", "chance accuracy"),
    ("n", "examples"),
]


def _card_value(card: dict | None, key: str) -> str:
    if not card:
        return "–"
    v = card.get(key)
    if v is None:
        return "–"
    if key == "patching_peak":
        return f"{v['recovery']:.2f} @ L{v['layer']} B{v['block']}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def causal_page(ctx: Context) -> None:
    st.header("Causal tests: do the memory blocks carry the reasoning?")
    run = choose(ctx, ctx.block_runs(), "causal.run")
    if run is None:
        return
    report = None
    with section("report card"):
        report = core.read(ctx.root, run, "analysis/report.json")
        if report is None:
            missing(
                run,
                "causal report (analysis/report.json)",
                f"rim-lens analyze report {run.shown}",
                "ablation, knockout, patching, interchange and probes on the run and its control",
            )
        else:
            _report_card(report)
    with st.expander(
        "Run the causal report from here" if report is None else "Run the causal report again",
        expanded=report is None,
    ):
        _report_button(ctx, run)

    control = _control(ctx, run, report)
    pairs = [(run.path.name if run.path.name in ("rim", "pause") else "run", run)] + (
        [("control", control)] if control else []
    )
    for title, name, build in (
        ("Ablation", "ablate", lambda t: figures.ablation_bars(t)),
        (
            "Activation patching",
            "patch",
            lambda t: figures.layer_block_heatmap(
                t, "recovery", "Patching: recovery of the clean answer", zmid=0
            ),
        ),
        ("Attention knockout", "knockout", lambda t: figures.knockout_bars(t)),
        ("Interchange", "interchange", lambda t: figures.interchange_matrix(t)),
    ):
        st.subheader(title)
        cols = st.columns(len(pairs))
        for col, (who, r) in zip(cols, pairs):
            with col, section(f"{name} of {r.shown}"):
                table = core.read(ctx.root, r, f"analysis/{name}.parquet")
                if table is None:
                    st.caption(f"{who}: {r.name}")
                    missing(
                        r, f"{name} results (analysis/{name}.parquet)", f"rim-lens analyze {name} {r.shown}"
                    )
                else:
                    fig = build(table)
                    fig.update_layout(title=f"{fig.layout.title.text}<br><sup>{who}: {r.name}</sup>")
                    if name in ("patch", "interchange"):  # "0", "1", "all": categories, not numbers
                        fig.update_xaxes(type="category").update_yaxes(type="category")
                    chart(fig, key=f"causal.{name}.{who}")
    if control is None:
        st.caption(
            "No control run found (a `pause` run beside this one); train one with "
            "`rim-lens train RECIPE --set method=pause`."
        )


def _report_card(report: dict) -> None:
    r, c = report.get("run") or {}, report.get("control")
    columns = {
        "metric": [label for _, label in CARD_ROWS],
        f"{r.get('method', 'run')}": [_card_value(r, k) for k, _ in CARD_ROWS],
    }
    if c:
        columns[f"control: {c.get('method', 'control')}"] = [_card_value(c, k) for k, _ in CARD_ROWS]
    left, right = st.columns([3, 2])
    with left:
        st.dataframe(pd.DataFrame(columns), hide_index=True, width="stretch")
    with right:
        st.markdown("**Verdict**")
        st.markdown(report.get("verdict", "(no verdict recorded)"))


def _report_button(ctx: Context, run: RunInfo) -> None:
    sib = run.path.parent / "pause"
    control_note = (
        f"control: {core.Root.display(ctx.root, sib)}"
        if (sib / "model").is_dir() and sib != run.path
        else "no pause run beside it: no control"
    )
    n = st.number_input(
        "Held-out examples per analysis",
        min_value=8,
        max_value=5000,
        value=200,
        step=8,
        key=f"report.n.{run.name}",
    )
    st.caption(f"Writes {run.shown}/analysis/report.json and report.md ({control_note}). Same as:")
    command(f"rim-lens analyze report {run.shown} --n {int(n)}")
    if st.button("Run causal report", key=f"report.go.{run.name}"):
        from rim_lens.analysis.report import build_report

        with (
            section("rim-lens analyze report"),
            st.spinner("Running ablation, knockout, patching, interchange and probes…"),
        ):
            core.check_tree(ctx.root, run.path)
            control = None
            if (sib / "model").is_dir() and sib != run.path:
                control = ctx.root.inside(sib)
                core.check_tree(ctx.root, control)
            direct = run.path.parent / "direct"
            direct = ctx.root.inside(direct) if (direct / "model").is_dir() else None
            build_report(run.path, control=control, direct=direct, n=int(n))
            st.rerun()


def _control(ctx: Context, run: RunInfo, report: dict | None) -> RunInfo | None:
    """The control run: the one the report names (if it lies under the root), else the run of
    that name beside this one, else the `pause` run beside it."""
    recorded = (report or {}).get("control") or {}
    candidates, note = [], ""
    if recorded.get("run"):
        path = Path(recorded["run"])
        candidates.append(path if path.is_absolute() else Path.cwd() / path)
        candidates.append(run.path.parent / path.name)
    candidates.append(run.path.parent / "pause")
    for path in candidates:
        try:
            path = ctx.root.inside(path)
        except core.OutsideRoot:
            note = f"The report's control run {recorded['run']} is not under the runs root; showing the one beside this run."
            continue
        if path != run.path and path.is_dir() and core.is_run_dir(path):
            if note:
                st.caption(note)
            return RunInfo(path.relative_to(ctx.root.path).as_posix(), path, ctx.root.display(path))
    return None


# == Playground ====================================================================================
def playground_page(ctx: Context) -> None:
    st.header("Playground: intervene on the memory blocks")
    st.caption(
        "Ablate or patch block states of one example and see every block's readout change. Runs live on CPU."
    )
    run, lab = _block_run(ctx, "play.run")
    if lab is None:
        return
    if not lab.examples:
        st.warning(f"{run.shown}/data/eval.jsonl holds no examples.")
        return
    n = len(lab.examples)
    label = lambda i: f"{i}: {lab.examples[i].question} → {lab.examples[i].answer}"  # noqa: E731
    i = st.selectbox("Example", range(n), format_func=label, key="play.example")
    kind = st.radio(
        "Intervention", ["ablate", "patch from another example"], horizontal=True, key="play.kind"
    )
    if kind == "ablate":
        mode = st.selectbox(
            "Ablation",
            ["zero", "mean", "resample"],
            key="play.mode",
            help="zero: states set to 0; mean: the mean over held-out examples; resample: another example's states",
        )
        donor = None
    else:
        mode = "patch"
        donor = st.selectbox(
            "Patch block states from", range(n), index=(i + 1) % n, format_func=label, key="play.donor"
        )
    slots = lab_slots(lab)
    c1, c2, c3 = st.columns(3)
    blocks = c1.multiselect(
        "Blocks", list(range(1, lab.spec.K + 1)), default=list(range(1, lab.spec.K + 1)), key="play.blocks"
    )
    layers = c2.multiselect(
        "Layers",
        list(range(lab.backend.n_layers)),
        default=list(range(lab.backend.n_layers)),
        key="play.layers",
        help="the state entering layer l is replaced",
    )
    chosen_slots = c3.multiselect("Slots", slots, default=slots, key="play.slots")
    settings = (run.name, i, mode, donor, tuple(blocks), tuple(layers), tuple(chosen_slots))
    go = st.button("Run intervention", type="primary", key="play.go")
    if not (blocks and layers and chosen_slots):
        st.info("Choose at least one block, one layer and one slot.")
        return
    if go:
        with section("intervention"), st.spinner("Running the model with and without the intervention…"):
            st.session_state["play.result"] = (
                settings,
                _intervene(lab, run, i, mode, donor, blocks, layers, [slots.index(s) for s in chosen_slots]),
            )
    saved = st.session_state.get("play.result")
    if saved is None or saved[0] != settings:
        st.info("Press **Run intervention** to see the effect of these settings.")
        return
    _show_intervention(lab, i, mode, donor, saved[1])


POPULATION = 200  # held-out examples whose states give the mean and the resampling donors


@st.cache_resource(show_spinner="Computing the block states of the held-out examples…", max_entries=4)
def _population_states(run_dir: str, model_stamp: int, _lab):
    """Clean block states [n, n_layers, K, M + 2, d] of the first POPULATION held-out examples."""
    from rim_lens.analysis import interventions as iv

    with core.model_lock(_lab):
        return iv.clean_states(_lab.backend, _lab.builder, _lab.examples[:POPULATION])


def _intervene(
    lab, run: RunInfo, i: int, mode: str, donor: int | None, blocks, layers, slots
) -> pd.DataFrame:
    """Per block k: the readout and teacher-forced score of the gold answer, intact and intervened."""
    import torch

    from rim_lens.analysis import interventions as iv

    sel = iv.select(lab.backend, lab.spec.K, lab.spec.M, layers, blocks, slots)
    sites = sel.sites()
    ex = lab.examples[i]
    with core.model_lock(lab):
        if mode == "patch":
            src = iv.clean_states(lab.backend, lab.builder, [lab.examples[donor]])[0]
            values = lambda ex, l, k, j: src[l, k - 1, j].expand(len(ex), -1)  # noqa: E731
        elif mode == "zero":
            values = iv.ablation_values(torch.zeros(1, 1, 1, 1, lab.backend.d_model), mode)
    if mode in ("mean", "resample"):
        pop = _population_states(str(run.path), core.tree_stamp(run.path / "model"), lab)  # [n, L, K, S, d]
        with core.model_lock(lab):
            own = iv.clean_states(lab.backend, lab.builder, [ex])
        # This example first: ablation_values indexes states by example; resample draws another row.
        others = [x for x in range(len(pop)) if x != i]
        values = iv.ablation_values(torch.cat([own, pop[others]]), mode, seed=0)
    tok, sq = lab.tokenizer, lab.spec.readout_sees_question
    before = _readouts(lab, run, ex)

    def metric(logits, batch, ex_idx):
        return iv.answer_scores(logits, batch)[1]  # log-prob of the gold answer

    rows = []
    for k in range(1, lab.spec.K + 1):
        variant = iv.Variant([s for s in sites if s[1] <= k], values)
        seq = lab.builder.scored(ex, n_blocks=k)
        with core.model_lock(lab):
            logprob = iv.run_variants(
                lab.backend, [seq], [iv.Variant([]), variant], metric, tok.pad_token_id, sq
            )[:, 0]
            after = (
                iv.decode_with_edits(lab.backend, lab.builder, [ex], variant, n_blocks=k)[0]
                if variant.sites
                else before.loc[k - 1, "readout"]
            )
        rows.append(
            {
                "block": k,
                "readout_before": before.loc[k - 1, "readout"],
                "readout_after": after,
                "correct_before": bool(before.loc[k - 1, "correct"]),
                "correct_after": bool(lab.task.answers_match(after, ex.answer)),
                "logprob_before": float(logprob[0]),
                "logprob_after": float(logprob[1]),
                "sites": len(variant.sites),
            }
        )
    table = pd.DataFrame(rows)
    table["changed"] = table["readout_before"] != table["readout_after"]
    return table


def _show_intervention(lab, i: int, mode: str, donor: int | None, table: pd.DataFrame) -> None:
    ex = lab.examples[i]
    final = table.iloc[-1]
    what = (
        f"{mode} ablation"
        if mode != "patch"
        else f"states patched from example {donor} (gold {lab.examples[donor].answer})"
    )
    c1, c2, c3 = st.columns(3)
    c1.metric("gold answer", ex.answer)
    c2.metric(
        "answer, intact",
        final["readout_before"],
        "correct" if final["correct_before"] else "wrong",
        delta_color="normal" if final["correct_before"] else "inverse",
    )
    c3.metric(
        f"answer under {mode}",
        final["readout_after"],
        "correct" if final["correct_after"] else "wrong",
        delta_color="normal" if final["correct_after"] else "inverse",
    )
    changed = int(table["changed"].sum())
    (st.success if changed else st.info)(
        f"{what}: the readout changed after {changed} of {len(table)} blocks"
        + (" — the final answer changed." if final["changed"] else " — the final answer is unchanged.")
    )
    chart(figures.intervention_effect(table), key="play.effect")
    st.dataframe(
        table[
            [
                "block",
                "readout_before",
                "readout_after",
                "changed",
                "correct_before",
                "correct_after",
                "logprob_before",
                "logprob_after",
            ]
        ],
        hide_index=True,
        width="stretch",
    )


PAGES = {
    "Runs": runs_page,
    "Memory explorer": explorer_page,
    "Probes": probes_page,
    "Causal": causal_page,
    "Playground": playground_page,
}
