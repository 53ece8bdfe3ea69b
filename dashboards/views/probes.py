"""Probes: whether a block knows its readout is right, which block holds which step's value, and
answering with the block a probe trusts most (from the run's saved probe analysis)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import core
from dashboards.core import missing, section
from dashboards.ui import Context, analysis_button, chart, choose
from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.analysis.card import percent
from rim_lens.analysis.registry import get_analysis

CORRECTNESS, VALUES = (f"{artefacts.ANALYSIS}/{stem}" for stem in get_analysis("probe").stems)


def page(ctx: Context) -> None:
    st.header("Probes")
    run = choose(ctx, ctx.block_runs(), "probes.run")
    if run is None:
        return
    with section("probe tables"):
        corr = core.read(ctx.root, run, f"{CORRECTNESS}.parquet")
        values = core.read(ctx.root, run, f"{VALUES}.parquet")
        summary = core.read(ctx.root, run, f"{VALUES}.json") or {}
        if corr is None and values is None:
            missing(
                run,
                f"probe results ({artefacts.ANALYSIS}/probe_*.parquet)",
                f"rim-lens analyze probe {run.shown}",
            )
            analysis_button(ctx, run, "probe", "Run probes now")
            return
        if corr is not None:
            _correctness(corr)
        else:
            missing(run, f"correctness probes ({CORRECTNESS}.parquet)", f"rim-lens analyze probe {run.shown}")
        if values is not None and len(values):
            _value_probes(values)
        _selection(summary.get("selection"))


def _correctness(corr: pd.DataFrame) -> None:
    st.subheader("Does a block know whether its readout is right?")
    notes = list(corr["note"].dropna().loc[lambda s: s != ""].unique()) if "note" in corr else []
    if corr["auroc"].notna().any():
        title = "Correctness probe AUROC (0.5 = chance)"
        chart(figures.layer_block_heatmap(corr, "auroc", title, zmid=0.5), key="probes.auroc")
        for note in notes[:5]:
            st.caption(note)
    else:
        reasons = "; ".join(notes[:5] or ["no block has both right and wrong readouts"])
        st.info(f"No correctness probe could be fitted: {reasons}")


def _value_probes(values: pd.DataFrame) -> None:
    st.subheader("Which block holds which step's value?")
    variables = list(dict.fromkeys(values["variable"])) if "variable" in values else ["value"]
    left, middle, right = st.columns(3)
    with left:
        variable = st.selectbox(
            "Variable",
            variables,
            key="probes.variable",
            help="value: what the step itself writes; the others are derived from the steps (the last "
            "running sum is the answer)",
        )
    of_variable = values[values["variable"] == variable] if "variable" in values else values
    steps = sorted(int(s) for s in of_variable["step"].dropna().unique())
    with middle:
        step = st.selectbox("Step t", steps, key="probes.step")
    with right:
        metric = st.radio("Show", ["score", "selectivity", "control"], horizontal=True, key="probes.metric")
    part = of_variable[of_variable["step"] == step]
    target = part["target"].dropna().iloc[0] if "target" in part and part["target"].notna().any() else "value"
    if part["score"].notna().any():
        title = f"Step {step} ({target}) probe {metric}, layer × block" + (
            "" if variable == "value" else f" ({variable})"
        )
        zmid = 0.0 if metric == "selectivity" else None
        chart(figures.layer_block_heatmap(part, metric, title, zmid=zmid), key="probes.values")
    else:
        st.info(f"No probe could be fitted for step {step}: {'; '.join(part['note'].dropna().unique())}")
    fitted = of_variable.dropna(subset=["score"])
    if fitted.empty:
        return
    layers = sorted(int(l) for l in fitted["layer"].unique())
    _, best = figures.probe_layer(values, None, variable)
    layer = st.selectbox(
        "Layer for the step × block views", layers, index=layers.index(best), key="probes.layer"
    )
    left, right = st.columns(2)
    with left:
        chart(figures.value_probe_heatmap(values, layer=layer, variable=variable), key="probes.diag")
    with right:
        curves = figures.probe_curves(values, layer=layer, variable=variable)
        chart(curves.update_xaxes(dtick=1), key="probes.curves")


def _selection(selection: dict | None) -> None:
    st.subheader("Choosing the answer by probe confidence")
    if not selection:
        st.caption(f'No probe-based answer selection recorded ({VALUES}.json has no "selection").')
        return
    cols = st.columns(4)
    cols[0].metric("probe-selected block", percent(selection.get("selected")))
    cols[1].metric("final block", percent(selection.get("final_block")))
    cols[2].metric("random block", percent(selection.get("random_block")))
    cols[3].metric("any block (oracle)", percent(selection.get("any_block")))
    st.caption(
        f"On the {selection.get('n_any')} examples where some block is right: probe-selected "
        f"{percent(selection.get('selected_when_any'))}, final block "
        f"{percent(selection.get('final_block_when_any'))} "
        f"(probe at layer {selection.get('layer')}, {selection.get('n')} examples)."
    )
