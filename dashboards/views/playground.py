"""Playground: intervene on one example's block states and see every block's readout change
(`Lab.effect` with a named intervention; the model runs live on CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from dashboards import core
from dashboards.core import section
from dashboards.ui import Context, block_run, chart
from rim_lens.analysis import figures
from rim_lens.analysis.interventions import ABLATIONS, Patch, ablation
from rim_lens.analysis.sites import block_labels
from rim_lens.model.layouts import slot_names

COLUMNS = [
    "block",
    "readout_before",
    "readout_after",
    "changed",
    "correct_before",
    "correct_after",
    "logprob_before",
    "logprob_after",
]


def page(ctx: Context) -> None:
    st.header("Playground: intervene on the memory blocks")
    st.caption(
        "Ablate or patch block states of one example and see every block's readout change. Runs live on CPU."
    )
    run, lab = block_run(ctx, "play.run")
    if lab is None:
        return
    if not lab.examples:
        st.warning(f"{lab.source} holds no examples.")
        return
    n = len(lab.examples)

    def label(i: int) -> str:
        return f"{i}: {lab.examples[i].question} → {lab.examples[i].answer}"

    i = st.selectbox("Example", range(n), format_func=label, key="play.example")
    mode, donor = _choose_intervention(i, n, label)
    slots = slot_names(lab.spec)
    c1, c2, c3 = st.columns(3)
    all_blocks, all_layers = list(block_labels(lab.spec.K)), list(range(lab.backend.n_layers))
    blocks = c1.multiselect("Blocks", all_blocks, default=all_blocks, key="play.blocks")
    layers = c2.multiselect(
        "Layers",
        all_layers,
        default=all_layers,
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
        intervention = ablation(mode) if donor is None else Patch(from_=lab.examples[donor])
        where = dict(layers=layers, blocks=blocks, slots=[slots.index(s) for s in chosen_slots])
        with section("intervention"), st.spinner("Running the model with and without the intervention…"):
            with core.model_lock(lab):
                st.session_state["play.result"] = (
                    settings,
                    lab.effect(lab.examples[i], intervention, **where),
                )
    saved = st.session_state.get("play.result")
    if saved is None or saved[0] != settings:
        st.info("Press **Run intervention** to see the effect of these settings.")
        return
    _show(lab, i, mode, donor, saved[1].table)


def _choose_intervention(i: int, n: int, label: Callable[[int], str]) -> tuple[str, int | None]:
    """The intervention on example `i` of `n` the user picks: an ablation mode and no donor, or
    "patch" and the example whose block states are patched in."""
    kind = st.radio(
        "Intervention", ["ablate", "patch from another example"], horizontal=True, key="play.kind"
    )
    if kind == "ablate":
        mode = st.selectbox(
            "Ablation",
            list(ABLATIONS),
            key="play.mode",
            help="zero: states set to 0; mean: the mean over held-out examples; "
            "resample: another example's states",
        )
        return mode, None
    donor = st.selectbox(
        "Patch block states from", range(n), index=(i + 1) % n, format_func=label, key="play.donor"
    )
    return "patch", donor


def _show(lab, i: int, mode: str, donor: int | None, table: pd.DataFrame) -> None:
    ex = lab.examples[i]
    final = table.iloc[-1]
    what = (
        f"{mode} ablation"
        if mode != "patch"
        else f"states patched from example {donor} (gold {lab.examples[donor].answer})"
    )
    c1, c2, c3 = st.columns(3)
    c1.metric("gold answer", ex.answer)
    for column, when, title in ((c2, "before", "answer, intact"), (c3, "after", f"answer under {mode}")):
        right = bool(final[f"correct_{when}"])
        column.metric(
            title,
            final[f"readout_{when}"],
            "correct" if right else "wrong",
            delta_color="normal" if right else "inverse",
        )
    changed = int(table["changed"].sum())
    (st.success if changed else st.info)(
        f"{what}: the readout changed after {changed} of {len(table)} blocks"
        + (" — the final answer changed." if final["changed"] else " — the final answer is unchanged.")
    )
    chart(figures.intervention_effect(table), key="play.effect")
    st.dataframe(table[COLUMNS], hide_index=True, width="stretch")
