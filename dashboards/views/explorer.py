"""Memory explorer: one example's prompt, its readout after every block, its block states, their
place in the run's PCA, and what they read as through the logit lens."""

from __future__ import annotations

import streamlit as st

from dashboards import core
from dashboards.core import RunInfo, missing, section
from dashboards.ui import Context, analysis_button, block_run, chart, esc, pick_example
from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.model.layouts import Role, slot_names

MEAN_SLOT = "mean over slots"


def page(ctx: Context) -> None:
    st.header("Memory explorer")
    run, lab = block_run(ctx, "explorer.run")
    if lab is None:
        return
    ex = pick_example(lab, "explorer")
    if ex is None:
        return
    st.markdown(
        f"**Question:** `{ex.question}` — **gold answer:** `{ex.answer}`"
        + (f" — steps: `{lab.task.join_steps(ex.steps)}`" if ex.steps else "")
    )

    with section("tokens"):
        seq = lab.builder.prompt(ex)
        tokens = lab.tokenizer.convert_ids_to_tokens(seq.ids)
        roles = [Role(r).name.lower().replace("_", " ") for r in seq.roles]
        title = f"Inference prompt: {len(tokens)} tokens, {lab.spec.K} blocks of {lab.spec.M + 2}"
        chart(figures.token_roles(tokens, roles, seq.blocks, title=title), key="explorer.tokens")

    with section("readouts"):
        readouts = _readouts(lab, run, ex)
        chart(figures.block_readouts(readouts), key="explorer.readouts")
        st.dataframe(readouts, hide_index=True)

    slots = slot_names(lab.spec)
    slot = st.selectbox("Slot of the block", [MEAN_SLOT, *slots], index=0, key="explorer.slot")
    j = None if slot == MEAN_SLOT else slots.index(slot)
    states = None
    with section("block states"):
        states = _states(lab, run, ex)
        norms = states.norms()
        shown = norms if j is None else norms[norms["slot"] == j]
        title = f"State norm, layer × block ({esc(slot)})"
        chart(figures.layer_block_heatmap(shown, "norm", title), key="explorer.norm")
    if states is None:
        return

    with section("PCA"):
        _pca(ctx, run, lab, states, j, slot)

    with section("logit lens"):
        from rim_lens.analysis.lens import logit_lens

        at = len(slots) - 1 if j is None else j
        with core.model_lock(lab):
            table = logit_lens(lab.backend.lens_model, lab.tokenizer, states, slots=[at], top_k=1)
        fig = figures.lens_top_tokens(table).update_layout(
            title=f"Logit lens at slot {esc(slots[at])} of every block: top token and its probability"
        )
        chart(fig, key="explorer.lens")


@st.cache_data(show_spinner=False, max_entries=256)
def _readouts_cached(run_dir: str, model_stamp: int, question: str, answer: str, _lab, _ex):
    with core.model_lock(_lab):
        return _lab.readouts(_ex)


def _readouts(lab, run: RunInfo, ex):
    return _readouts_cached(
        str(run.path), core.tree_stamp(run.path / artefacts.MODEL), ex.question, ex.answer, lab, ex
    )


@st.cache_resource(show_spinner=False, max_entries=256)
def _states_cached(run_dir: str, model_stamp: int, question: str, answer: str, _lab, _ex):
    with core.model_lock(_lab):
        return _lab.states([_ex])


def _states(lab, run: RunInfo, ex):
    """The example's clean block states at every layer (a `BlockStates` of one example)."""
    return _states_cached(
        str(run.path), core.tree_stamp(run.path / artefacts.MODEL), ex.question, ex.answer, lab, ex
    )


@st.cache_resource(show_spinner="Fitting PCA on the run's capture…", max_entries=4)
def _capture_pca(capture_dir: str, capture_stamp: int):
    """`rim_lens.analysis.pca.analyse` of the run's capture (as it is on disk)."""
    from rim_lens.analysis import pca
    from rim_lens.analysis.capture import CaptureStore

    store = CaptureStore(capture_dir)
    return store.meta, pca.analyse(store)


def _pca(ctx: Context, run: RunInfo, lab, states, j: int | None, slot: str) -> None:
    meta_path = core.artefact(ctx.root, run, f"{artefacts.ANALYSIS}/{artefacts.CAPTURE}/meta.json")
    if meta_path is None:
        missing(
            run,
            f"capture of block states ({artefacts.ANALYSIS}/{artefacts.CAPTURE})",
            f"rim-lens analyze {artefacts.CAPTURE} {run.shown}",
            "the PCA is fitted on the run's captured held-out states",
        )
        analysis_button(ctx, run, artefacts.CAPTURE, "Capture block states now")
        return
    core.check_tree(ctx.root, run.path)
    capture_dir = meta_path.parent
    meta, result = _capture_pca(str(capture_dir), core.tree_stamp(capture_dir))
    if meta["K"] != lab.spec.K or meta.get("d_model") != states.d_model:
        st.warning(
            f"The capture was made with K={meta['K']}, d_model={meta.get('d_model')}, not this checkpoint's "
            f"K={lab.spec.K}, d_model={states.d_model}; capture again with "
            f"`rim-lens analyze {artefacts.CAPTURE} {run.shown}`."
        )
        return
    mine = result.projection(states)
    shown = mine if j is None else mine[mine["slot"] == j]
    left, right = st.columns(2)
    for column, pc in ((left, "pc1"), (right, "pc2")):
        with column:
            title = f"{pc.upper()} of this example's states ({esc(slot)})"
            chart(figures.layer_block_heatmap(shown, pc, title), key=f"explorer.{pc}")
    layers = sorted(int(l) for l in mine["layer"].unique())
    layer = st.select_slider(
        "Layer of the PCA trajectory", options=layers, value=layers[-1], key="explorer.pca_layer"
    )
    trajectory = result.table if j is None else result.table[result.table["slot"] == j]
    chart(
        figures.pca_trajectories(trajectory, shown.assign(example="shown"), layer=layer),
        key="explorer.trajectory",
    )
    st.caption(
        f"PCA fitted on {meta['n']} captured held-out examples; solid lines: the population's mean path, "
        "dotted: this example."
    )
