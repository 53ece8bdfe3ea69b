"""Causal: the report's verdict as five findings (necessity, sufficiency, decodability, location,
variables), each with its intervals, the control's, its figures for both runs, and the card behind
them, with a column for every run compared (RiM, pause and Coconut side by side). Coconut runs
are listed too: their continuous thoughts are analysed as blocks."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import core
from dashboards.core import RunInfo, command, missing, section
from dashboards.ui import READ_ONLY, Context, chart, choose
from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.analysis.card import CARD, calibrated, card_value, percent
from rim_lens.analysis.registry import analysis_of
from rim_lens.analysis.report import REPORT_JSON, control_of, sibling
from rim_lens.analysis.verdict import PARTIAL, SUPPORTED, Finding
from rim_lens.methods import DIRECT, PAUSE, RIM, latent_methods

# The saved analysis each finding is drawn from, and how to draw it.
FIGURES = {
    "necessity": ("Ablation", "ablate", figures.ablation_bars),
    "sufficiency": ("Interchange", "interchange", figures.interchange_matrix),
    "decodability": ("Value probes", "probe_values", figures.value_probe_heatmap),
    "location": (
        "Activation patching",
        "patch",
        lambda t: figures.layer_block_heatmap(
            t, "recovery", "Patching: recovery of the clean answer", zmid=0
        ),
    ),
}
KNOCKOUT = ("Attention knockout", "knockout", figures.knockout_bars)


def page(ctx: Context) -> None:
    st.header("Causal tests: do the memory blocks (or continuous thoughts) carry the reasoning?")
    run = choose(ctx, ctx.block_runs(latent_methods()), "causal.run")
    if run is None:
        return
    report = None
    with section("report card"):
        report = core.read(ctx.root, run, f"{artefacts.ANALYSIS}/{REPORT_JSON}")
        if report is None:
            missing(
                run,
                f"causal report ({artefacts.ANALYSIS}/{REPORT_JSON})",
                f"rim-lens analyze report {run.shown}",
                "ablation, knockout, patching, interchange and probes on the run and its control",
            )
        else:
            _card(report)
    with st.expander(
        "Run the causal report from here" if report is None else "Run the causal report again",
        expanded=report is None,
    ):
        _report_button(ctx, run)

    control = _control(ctx, run, report)
    pairs = [(run.path.name if run.path.name in latent_methods() else "run", run)]
    pairs += [("control", control)] if control else []
    found = {f["name"]: Finding.from_dict(f) for f in (report or {}).get("findings", [])}
    for name, spec in [*FIGURES.items(), ("knockout", KNOCKOUT)]:
        finding = found.get(name)
        st.subheader(f"{name.capitalize()}: {finding.outcome}" if finding else spec[0])
        if finding:
            _finding(finding)
        _figures(ctx, pairs, *spec)
        if name == "location":
            _attribution(ctx, run, report)
    _variables(ctx, pairs, found.get("variables"))
    if control is None:
        st.caption(
            "No control run found (a `pause` run beside this one); train one with "
            "`rim-lens train RECIPE --set method=pause`."
        )


def _card(report: dict) -> None:
    r, c = report.get("run") or {}, report.get("control")
    if "findings" not in report:
        st.warning("This report predates the four findings with intervals; run the report again.")
    columns = {
        "metric": [row.label for row in CARD],
        r.get("method", "run"): [card_value(r, row.key) for row in CARD],
    }
    if c:
        columns[f"control: {c.get('method', 'control')}"] = [card_value(c, row.key) for row in CARD]
    for other in report.get("compared") or []:
        columns[other.get("method", "compared")] = [card_value(other, row.key) for row in CARD]
    columns["how it is measured"] = [row.how for row in CARD]
    st.dataframe(pd.DataFrame(columns), hide_index=True, width="stretch")
    st.caption(f"Examples: {r.get('examples')}; backend {r.get('backend')}. Intervals are 95%.")
    found = [Finding.from_dict(f) for f in report.get("findings") or []]
    if found:
        verdicts = {
            "finding": [f.name for f in found],
            "outcome": [f.outcome + "".join(f"; {k}: {o}" for k, o in f.parts.items()) for f in found],
            "its test on planted models at this n": [calibrated(f) for f in found],
        }
        st.dataframe(pd.DataFrame(verdicts), hide_index=True, width="stretch")
        note = (report.get("calibration") or {}).get("note")
        if note:
            st.caption(f"Calibration: {note}.")

    with st.expander("The verdict in words"):
        st.markdown(report.get("verdict", "(no verdict recorded)").replace("\n", "\n\n"))


def _finding(finding: Finding) -> None:
    """A finding: its calibration (what its test detects on planted models at this n) beside its
    outcome and parts, the detail, and its intervals."""
    st.caption(f"Its test on planted models: {calibrated(finding)}. Outcome as stated: {finding.shown}.")
    for part, outcome in finding.parts.items():
        st.caption(f"Part '{part}': **{outcome}**")
    show = {SUPPORTED: st.success, PARTIAL: st.warning}.get(finding.outcome, st.info)
    show(finding.detail)
    _intervals(finding)


def _intervals(finding: Finding) -> None:
    """The finding's figures for the run and the control, with their intervals."""
    values = {f"run: {k}": v for k, v in finding.run.items()} | {
        f"control: {k}": v for k, v in finding.control.items()
    }
    colors = {k: RIM.color if k.startswith("run") else PAUSE.color for k in values}
    title = f"{finding.name.capitalize()}: {finding.figure}"
    fig = figures.estimates(values, title, finding.reference, colors).update_layout(height=340)
    chart(fig, key=f"causal.{finding.name}.intervals")


def _figures(ctx: Context, pairs: list[tuple[str, RunInfo]], title: str, stem: str, build) -> None:
    """The saved analysis `stem` of the run and the control side by side."""
    cols = st.columns(len(pairs))
    for col, (who, r) in zip(cols, pairs):
        with col, section(f"{stem} of {r.shown}"):
            table = core.read(ctx.root, r, f"{artefacts.ANALYSIS}/{stem}.parquet")
            what = analysis_of(stem)
            if table is None:
                st.caption(f"{who}: {r.name}")
                missing(
                    r,
                    f"{what} results ({artefacts.ANALYSIS}/{stem}.parquet)",
                    f"rim-lens analyze {what} {r.shown}",
                )
                continue
            fig = build(table)
            fig.update_layout(title=f"{fig.layout.title.text}<br><sup>{who}: {r.name}</sup>")
            if stem in ("patch", "interchange"):  # "0", "1", "all": categories, not numbers
                fig.update_xaxes(type="category").update_yaxes(type="category")
            chart(fig, key=f"causal.{stem}.{who}")


def _attribution(ctx: Context, run: RunInfo, report: dict | None) -> None:
    """Attribution patching beside exact patching on the run: its estimate, how the two rank the
    cells, and which block reads which (edge attribution)."""
    st.markdown(
        "**Attribution patching** (a gradient estimate: 2 forward passes and 1 backward for every cell)"
    )
    with section(f"attribution patching of {run.shown}"):
        estimate = core.read(ctx.root, run, f"{artefacts.ANALYSIS}/patch_attribution.parquet")
        exact = core.read(ctx.root, run, f"{artefacts.ANALYSIS}/patch.parquet")
        if estimate is None:
            missing(
                run,
                f"attribution patching ({artefacts.ANALYSIS}/patch_attribution.parquet)",
                f"rim-lens analyze patch {run.shown} --method attribution",
            )
            return
        card = (report or {}).get("run") or {}
        rho = card_value(card, "patching_attribution_spearman")
        note = card.get("patching_attribution_note")
        st.caption(
            f"Agreement with exact patching (Spearman over cells, 95% interval): {rho}"
            + (f" ({note})" if note and rho == "–" else "")
        )
        cols = st.columns(2)
        with cols[0]:
            chart(
                figures.layer_block_heatmap(
                    estimate, "recovery", "Attribution patching: estimated recovery", zmid=0
                ).update_xaxes(type="category"),
                key="causal.attribution.heatmap",
            )
        keys = [c for c in ("layer", "block", "slot") if c in estimate]
        same_cells = exact is not None and sorted(exact.columns) == sorted(estimate.columns)
        with cols[1]:
            if same_cells and len(exact.merge(estimate, on=keys)) == len(estimate):
                title = "Exact vs attribution, one point per cell"
                chart(figures.patching_agreement(exact, estimate, title), key="causal.attribution.agreement")
            else:
                st.caption("The saved exact patching covers other cells: run both with the same options.")
        edges = core.read(ctx.root, run, f"{artefacts.ANALYSIS}/patch_edges.parquet")
        if edges is not None:
            share = card.get("patching_attribution_edges") or {}
            if share:
                st.caption(
                    f"Of what blocks take from earlier blocks, {percent(share.get('previous_block_share'))} "
                    f"comes from the block just before (evenly spread: {percent(share.get('even_share'))})."
                )
            chart(figures.block_edges_heatmap(edges), key="causal.attribution.edges")


def _variables(ctx: Context, pairs: list[tuple[str, RunInfo]], finding: Finding | None) -> None:
    """The variables finding, then per variable the heat maps of IIA over layer x block: the run's
    (its basis, the placebo beside it, the full state) and the control's."""
    st.subheader(f"Variables: {finding.outcome}" if finding else "Causal abstraction")
    if finding:
        _finding(finding)
    stem = f"{artefacts.ANALYSIS}/abstraction.parquet"
    tables = {}
    for who, r in pairs:
        with section(f"abstraction of {r.shown}"):
            tables[who] = core.read(ctx.root, r, stem)
    first, run = pairs[0]
    if tables.get(first) is None:
        missing(run, f"causal abstraction results ({stem})", f"rim-lens analyze abstraction {run.shown}")
        return
    # Imported here: it loads TransformerLens (about 1.5 s), which only this section needs.
    from rim_lens.analysis.abstraction import map_rows

    for variable in tables[first]["variable"].unique():
        for who, r in pairs:
            table = tables.get(who)
            if table is None or map_rows(table, variable).empty:
                st.caption(f"{who}: {r.name} has no map of {variable}. Produce it with:")
                command(f"rim-lens analyze abstraction {r.shown}")
                continue
            fig = figures.iia_maps(map_rows(table, variable), variable)
            fig.update_layout(title=f"{fig.layout.title.text}<br><sup>{who}: {r.name}</sup>", height=320)
            chart(fig, key=f"causal.abstraction.{variable}.{who}")


def _report_button(ctx: Context, run: RunInfo) -> None:
    control, direct = sibling(run.path, PAUSE.name), sibling(run.path, DIRECT.name)
    note = (
        f"control: {core.Root.display(ctx.root, control)}"
        if control
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
    st.caption(f"Writes {run.shown}/{artefacts.ANALYSIS}/{REPORT_JSON} and report.md ({note}). Same as:")
    command(f"rim-lens analyze report {run.shown} --n {int(n)}")
    if ctx.read_only:
        st.caption(READ_ONLY)
    if st.button("Run causal report", key=f"report.go.{run.name}", disabled=ctx.read_only):
        from rim_lens.analysis.report import build_report

        with (
            section("rim-lens analyze report"),
            st.spinner("Running ablation, knockout, patching, interchange and probes…"),
        ):
            core.check_tree(ctx.root, run.path)
            for other in filter(None, (control, direct)):
                core.check_tree(ctx.root, ctx.root.inside(other))
            control_dir = ctx.root.inside(control) if control else None
            direct_dir = ctx.root.inside(direct) if direct else None
            build_report(run.path, control=control_dir, direct=direct_dir, n=int(n))
            st.rerun()


def _control(ctx: Context, run: RunInfo, report: dict | None) -> RunInfo | None:
    """The control run the report names, if it lies under the root, else the pause run beside it."""
    for path in dict.fromkeys(filter(None, (control_of(run.path, report), sibling(run.path, PAUSE.name)))):
        try:
            path = ctx.root.inside(path)
        except core.OutsideRoot:
            st.caption(
                f"The report's control run {path} is not under the runs root; showing the one beside this "
                "run."
            )
            continue
        if path != run.path and core.is_run_dir(path):
            return RunInfo(path.relative_to(ctx.root.path).as_posix(), path, ctx.root.display(path))
    return None
