"""Runs: every run under the root, its training curves, its evaluation beside the runs next to it,
and its memory-budget sweep."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import core
from dashboards.core import RunInfo, missing, section
from dashboards.ui import Context, chart, choose
from rim_lens import artefacts
from rim_lens.analysis import figures
from rim_lens.compare import comparison
from rim_lens.errors import RunError


def page(ctx: Context) -> None:
    st.header("Runs")
    st.caption(f"Every run under {ctx.root.path} (a run is a folder with config.yaml or model/).")
    rows = [core.run_summary(ctx.root, r) for r in ctx.runs]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for row in rows:
        if not row["readable"]:
            st.warning(f"Run {row['run']}: some of its files cannot be read: {row['error']}")

    candidates = ctx.runs if ctx.picked is None or ctx.picked in ctx.runs else [ctx.picked, *ctx.runs]
    run = choose(ctx, candidates, "runs.run")
    if run is None:
        return
    info = core.run_summary(ctx.root, run)
    status = info["status"]
    line = (
        f"**{run.shown}** — {info['method'] or '?'} on {info['task'] or '?'}, "
        f"model {info['model'] or '?'}, status **{status}**"
    )
    (st.error if status == "failed" or "corrupt" in status else st.markdown)(
        line + (f": {info['error']}" if info["error"] else "")
    )
    if status == "unknown":
        st.caption("No status.json: the run was not started by `rim-lens train`, or predates it.")

    train_tab, eval_tab, budget_tab, analyses_tab = st.tabs(
        ["Training", "Evaluation", "Memory budget", "Analyses"]
    )
    with train_tab, section("training log"):
        _training(ctx, run)
    with eval_tab, section("evaluation"):
        _evaluation(ctx, run)
    with budget_tab, section("memory budget"):
        _budget(ctx, run)
    with analyses_tab, section("analyses"):
        st.caption("Every analysis rim-lens knows (plugins' too), and which this run holds.")
        st.dataframe(pd.DataFrame(core.analyses_of(ctx.root, run)), hide_index=True, width="stretch")


def _training(ctx: Context, run: RunInfo) -> None:
    log = core.read(ctx.root, run, artefacts.TRAIN_LOG)
    if not log:
        missing(
            run, f"training log ({artefacts.TRAIN_LOG})", "rim-lens train RECIPE --runs-dir ... --name ..."
        )
        return
    if not any("loss" in r for r in log):
        st.info(
            f"{run.shown}/{artefacts.TRAIN_LOG} has no loss records yet (training may have just started)."
        )
    else:
        chart(figures.loss_curves(log, title=f"Training loss per stage: {run.name}"), key="runs.loss")
    stages = list(dict.fromkeys(r["stage"] for r in log if "readout_accuracy" in r))
    if "grounding" in stages:
        st.caption(
            "Stage 1 (grounding): held-out teacher-forced accuracy of each step readout — "
            "the go / no-go check before stage 2."
        )
    for stage in stages:
        chart(figures.readout_curves(log, stage), key=f"runs.readout.{stage}")


def _evaluation(ctx: Context, run: RunInfo) -> None:
    metrics, notes = {}, []
    for sib in core.siblings(ctx.runs, run) or [run]:
        try:
            m = core.read(ctx.root, sib, artefacts.METRICS)
        except RunError as err:
            notes.append(str(err))
            continue
        if not isinstance(m, dict):
            what = "has no" if m is None else "has a malformed"
            notes.append(
                f"{sib.shown} {what} {artefacts.METRICS}; produce it with `rim-lens eval {sib.shown}`"
            )
            continue
        metrics[sib.path.name] = m
    for n in notes:
        st.warning(n)
    if not metrics:
        missing(run, f"evaluation ({artefacts.METRICS})", f"rim-lens eval {run.shown}")
        return
    st.caption(
        f"{run.shown} against the runs beside it in {core.Root.display(ctx.root, run.path.parent)}/ "
        "(latency ratios are relative to the run called `direct`)."
    )
    st.dataframe(pd.DataFrame(comparison(metrics)), hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        chart(figures.comparison_bars(metrics), key="runs.compare")
    with right:
        chart(figures.per_block_accuracy(metrics).update_xaxes(dtick=1), key="runs.perblock")
    chance = next((m.get("chance_accuracy") for m in metrics.values() if m.get("chance_accuracy")), None)
    if chance:
        st.caption(
            f"Chance accuracy of this task: {chance:.3f}. Any-block accuracy is an oracle and rises with "
            "chance."
        )


def _budget(ctx: Context, run: RunInfo) -> None:
    if not core.uses_blocks(ctx.root, run):
        st.info(f"{run.shown} has no memory blocks, so there is no memory budget to vary.")
        return
    sweep = core.read(ctx.root, run, artefacts.SWEEP)
    if not sweep:
        missing(run, f"memory-budget sweep ({artefacts.SWEEP})", f"rim-lens eval {run.shown} --K 1,2,4,8")
        st.caption("Add `--M 1,2,4` to vary the memory tokens per block as well.")
        return
    chart(figures.budget_sweep(sweep), key="runs.budget")
    columns = [c for c in ("K", "M", "accuracy", "any_block_accuracy", "n_eval") if c in sweep[0]]
    st.dataframe(pd.DataFrame(sweep)[columns], hide_index=True)
