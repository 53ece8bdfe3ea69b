"""Every plotly figure of the project, built from result tables (dashboard and notebooks reuse these)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rim_lens.methods import color_of
from rim_lens.stats import Estimate


def _numeric(df: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """Rows where `cols` are all set (drops summary rows such as 'all blocks')."""
    out = df.dropna(subset=list(cols)).copy()
    for c in cols:
        out[c] = out[c].astype(int)
    return out


def layer_block_heatmap(df: pd.DataFrame, value: str, title: str, zmid: float | None = None) -> go.Figure:
    """Heat map of `value` over layer (rows) x block (columns); other axes are averaged."""
    grid = _numeric(df, "layer", "block").pivot_table(
        index="layer", columns="block", values=value, aggfunc="mean"
    )
    fig = px.imshow(
        grid,
        text_auto=".2f",
        aspect="auto",
        color_continuous_scale="RdBu_r" if zmid is not None else "Viridis",
        color_continuous_midpoint=zmid,
        labels=dict(x="block", y="layer", color=value),
        title=title,
    )
    fig.update_yaxes(dtick=1)
    fig.update_xaxes(dtick=1)
    return fig


def block_edges_heatmap(edges: pd.DataFrame, value: str = "recovery") -> go.Figure:
    """Which block reads which (edge attribution): one panel per layer, reader (rows) x source
    (columns), in the order the table lists them (question, blocks, answer)."""
    order = list(dict.fromkeys(edges["reader"]))
    layers = sorted(edges["layer"].unique())
    grids = [
        edges[edges["layer"] == l].pivot(index="reader", columns="source", values=value).loc[order, order]
        for l in layers
    ]
    fig = px.imshow(
        np.stack([g.values for g in grids]),
        facet_col=0,
        facet_col_wrap=min(4, len(layers)),
        x=order,
        y=order,
        color_continuous_scale="RdBu_r",
        color_continuous_midpoint=0,
        labels=dict(x="source (resid[layer] there)", y="reader", color=value),
        title="Edge attribution: what each block reads, per layer (share of the clean - corrupt gap)",
    )
    for i, annotation in enumerate(fig.layout.annotations):
        annotation.text = f"layer {layers[i]}"
    return fig


def patching_agreement(exact: pd.DataFrame, estimate: pd.DataFrame, title: str) -> go.Figure:
    """Exact patching's recovery against attribution patching's, one point per cell."""
    keys = [c for c in ("layer", "block", "slot") if c in exact and c in estimate]
    both = exact.merge(estimate, on=keys, suffixes=(" exact", " attribution"))
    both["cell"] = both[keys].astype(str).agg(", ".join, axis=1)
    fig = px.scatter(
        both,
        x="recovery exact",
        y="recovery attribution",
        color=both["layer"].astype(str),
        hover_name="cell",
        labels={"color": "layer"},
        title=title,
    )
    lo = float(min(both["recovery exact"].min(), both["recovery attribution"].min()))
    hi = float(max(both["recovery exact"].max(), both["recovery attribution"].max()))
    fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(dash="dot", color="grey"))
    return fig


def estimates(
    values: Mapping[str, Estimate | None],
    title: str,
    references: Mapping[str, float] | None = None,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Point values with their 95% intervals side by side (a missing one is left out), with
    horizontal reference lines (e.g. chance)."""
    shown = {label: e for label, e in values.items() if e is not None}
    labels = list(shown)
    fig = go.Figure(
        go.Scatter(
            x=labels,
            y=[shown[k].value for k in labels],
            mode="markers",
            marker=dict(size=12, color=[(colors or {}).get(k, "#1f77b4") for k in labels]),
            error_y=dict(
                type="data",
                symmetric=False,
                array=[shown[k].hi - shown[k].value for k in labels],
                arrayminus=[shown[k].value - shown[k].lo for k in labels],
            ),
            customdata=[[shown[k].lo, shown[k].hi, shown[k].n] for k in labels],
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}], n=%{customdata[2]}"
            "<extra></extra>",
            showlegend=False,
        )
    )
    for name, y in (references or {}).items():
        fig.add_hline(y=y, line_dash="dot", annotation_text=name)
    fig.update_layout(title=title, yaxis_title="value (95% interval)", xaxis_type="category")
    return fig


def ablation_bars(df: pd.DataFrame) -> go.Figure:
    """Accuracy with each block ablated alone and blocks 1..k cumulatively, against intact."""
    fig = go.Figure()
    for scope, name in (("block", "block k alone"), ("cumulative", "blocks 1..k")):
        part = df[df["scope"] == scope]
        fig.add_bar(
            x=part["block"].astype(int),
            y=part["accuracy"],
            name=name,
            customdata=part["logprob_change"],
            hovertemplate="block %{x}: accuracy %{y:.3f}<br>Δ log p %{customdata:.3f}",
        )
    for scope, dash in (("intact", "dash"), ("all", "dot")):
        row = df[df["scope"] == scope]
        if len(row):
            fig.add_hline(
                y=float(row["accuracy"].iloc[0]),
                line_dash=dash,
                annotation_text=f"{scope}: {float(row['accuracy'].iloc[0]):.2f}",
            )
    mode = df["mode"].iloc[0] if len(df) else ""
    fig.update_layout(
        title=f"{mode.capitalize()} ablation of block states",
        xaxis_title="block",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
        barmode="group",
    )
    return fig


def knockout_bars(df: pd.DataFrame) -> go.Figure:
    """Accuracy when attention edges to / between blocks are removed."""
    fig = go.Figure()
    for kind in ("answer->block", "block->earlier"):
        part = _numeric(df[df["knockout"] == kind], "block")
        fig.add_bar(x=part["block"], y=part["accuracy"], name=kind)
    intact = df[df["knockout"] == "none"]
    if len(intact):
        fig.add_hline(
            y=float(intact["accuracy"].iloc[0]),
            line_dash="dash",
            annotation_text=f"intact: {float(intact['accuracy'].iloc[0]):.2f}",
        )
    every = df[(df["knockout"] == "answer->block") & df["block"].isna()]
    if len(every):
        fig.add_hline(
            y=float(every["accuracy"].iloc[0]),
            line_dash="dot",
            annotation_text=f"answer sees no block: {float(every['accuracy'].iloc[0]):.2f}",
        )
    fig.update_layout(
        title="Attention knockout",
        xaxis_title="block k",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
        barmode="group",
    )
    return fig


def interchange_matrix(df: pd.DataFrame) -> go.Figure:
    """How often B's output becomes A's answer, by the layer and block whose states were swapped
    ("all": every selected layer or block at once)."""
    d = df[df["swap"] != "none"].copy()
    label = lambda v: "all" if pd.isna(v) else str(int(v))  # noqa: E731
    d["layer_label"], d["block_label"] = d["layer"].map(label), d["block"].map(label)
    grid = d.pivot_table(index="layer_label", columns="block_label", values="to_A", aggfunc="mean")
    key = lambda v: (v == "all", int(v) if v != "all" else 0)  # noqa: E731
    grid = grid.reindex(index=sorted(grid.index, key=key), columns=sorted(grid.columns, key=key))
    fig = px.imshow(
        grid,
        text_auto=".2f",
        aspect="auto",
        zmin=0,
        zmax=1,
        color_continuous_scale="Viridis",
        labels=dict(x="block swapped", y="layer swapped", color="→ A's answer"),
        title="Interchange: share of outputs that become the donor's answer",
    )
    return fig.update_xaxes(type="category").update_yaxes(type="category")


def per_block_accuracy(metrics: Mapping[str, dict]) -> go.Figure:
    """Accuracy of the readout after each block k, per method (flat lines for methods without blocks)."""
    fig = go.Figure()
    K = max((len(m.get("per_block_accuracy", [])) for m in metrics.values()), default=1)
    for name, m in metrics.items():
        color = color_of(m.get("method", name))
        if "per_block_accuracy" in m:
            fig.add_scatter(
                x=list(range(1, len(m["per_block_accuracy"]) + 1)),
                y=m["per_block_accuracy"],
                mode="lines+markers",
                name=name,
                line_color=color,
            )
        else:
            fig.add_scatter(
                x=[1, K],
                y=[m["accuracy"]] * 2,
                mode="lines",
                name=f"{name} (no blocks)",
                line=dict(color=color, dash="dash"),
            )
    chance = next((m.get("chance_accuracy") for m in metrics.values() if m.get("chance_accuracy")), None)
    if chance:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(
        title="Accuracy of the readout after each block",
        xaxis_title="block k",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
    )
    return fig.update_xaxes(dtick=1)


def loss_curves(log: Seq[dict], title: str = "Training loss") -> go.Figure:
    """Loss per optimizer step, one trace per stage, steps continuing across stages."""
    rows = [r for r in log if "loss" in r]
    fig = go.Figure()
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in rows):
        part = [r for r in rows if r["stage"] == stage]
        fig.add_scatter(
            x=[offset + r["step"] for r in part], y=[r["loss"] for r in part], mode="lines", name=stage
        )
        offset += part[-1]["step"]
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", yaxis_type="log")
    return fig


def readout_curves(log: Seq[dict], stage: str = "grounding") -> go.Figure:
    """Held-out teacher-forced readout accuracy during a stage (stage 1: one line per step)."""
    rows = [r for r in log if r.get("stage") == stage and "readout_accuracy" in r]
    names = list(dict.fromkeys(k for r in rows for k in r["readout_accuracy"]))
    fig = go.Figure()
    for name in names:
        fig.add_scatter(
            x=[r["step"] for r in rows],
            y=[r["readout_accuracy"].get(name) for r in rows],
            mode="lines+markers",
            name=name,
        )
    fig.update_layout(
        title=f"Held-out readout accuracy during {stage}",
        xaxis_title="step",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
    )
    return fig


def comparison_bars(metrics: Mapping[str, dict]) -> go.Figure:
    """Final-block (and any-block) accuracy per method."""
    names = list(metrics)
    fig = go.Figure()
    fig.add_bar(
        x=names,
        y=[metrics[n]["accuracy"] for n in names],
        name="final block",
        marker_color=[color_of(metrics[n].get("method"), "#888") for n in names],
    )
    fig.add_bar(
        x=names,
        y=[metrics[n].get("any_block_accuracy") for n in names],
        name="any block",
        marker_color="#bbbbbb",
    )
    fig.update_layout(
        title="Held-out exact-match accuracy", yaxis_title="accuracy", yaxis_range=[0, 1.05], barmode="group"
    )
    return fig


def budget_sweep(sweep: Seq[dict]) -> go.Figure:
    """Accuracy against the number of blocks K at inference, one line per M."""
    df = pd.DataFrame(sweep)
    fig = px.line(
        df.sort_values("K"),
        x="K",
        y="accuracy",
        color=df["M"].astype(str),
        markers=True,
        labels={"color": "M"},
        title="Memory budget: accuracy vs blocks K (and tokens per block M)",
    )
    fig.update_layout(yaxis_range=[0, 1.05])
    return fig


def pca_trajectories(
    trajectory: pd.DataFrame, examples: pd.DataFrame | None = None, layer: int | None = None
) -> go.Figure:
    """Mean path of the block states through blocks 1..K in PCA space, per slot, with a few
    individual examples for comparison (one layer; default the last)."""
    layer = int(trajectory["layer"].max()) if layer is None else layer
    t = trajectory[trajectory["layer"] == layer]
    fig = go.Figure()
    for slot, part in t.groupby("slot"):
        part = part.sort_values("block")
        fig.add_scatter(
            x=part["pc1"],
            y=part["pc2"],
            mode="lines+markers+text",
            text=part["block"].astype(str),
            textposition="top center",
            name=f"mean, slot {slot}",
        )
    if examples is not None and len(examples):
        ex = examples[examples["layer"] == layer]
        for e, part in ex.groupby("example"):
            part = part.groupby("block")[["pc1", "pc2"]].mean().reset_index()
            fig.add_scatter(
                x=part["pc1"],
                y=part["pc2"],
                mode="lines+markers",
                line=dict(dash="dot", width=1),
                marker=dict(size=5),
                name=f"example {e}",
                opacity=0.6,
            )
    fig.update_layout(
        title=f"Block states in PCA space (layer {layer}); numbers are block indices",
        xaxis_title="PC1",
        yaxis_title="PC2",
    )
    return fig


def probe_layer(
    values: pd.DataFrame, layer: int | None, variable: str = "value"
) -> tuple[pd.DataFrame, int | None]:
    """The fitted probes of `variable` at one layer (default: the layer with the best mean
    selectivity)."""
    v = values.dropna(subset=["score"])
    if "variable" in v:
        v = v[v["variable"] == variable]
    if v.empty:
        return v, layer
    if layer is None:
        by_layer = v.groupby("layer")["selectivity"].mean()
        layer = int(by_layer.idxmax()) if by_layer.notna().any() else int(v["layer"].max())
    return v[v["layer"] == layer], layer


def value_probe_heatmap(values: pd.DataFrame, layer: int | None = None, variable: str = "value") -> go.Figure:
    """Probe score of `variable` over block x step at one layer (default: the most selective); a
    diagonal says block k holds step k's value."""
    v, layer = probe_layer(values, layer, variable)
    if v.empty:
        return go.Figure().update_layout(title="No value probes could be fitted")
    grid = v.pivot_table(index="step", columns="block", values="score", aggfunc="mean")
    sel = v.pivot_table(index="step", columns="block", values="selectivity", aggfunc="mean")
    text = grid.round(2).astype(str) + "<br>sel " + sel.reindex_like(grid).round(2).astype(str)
    fig = px.imshow(
        grid,
        aspect="auto",
        zmin=0,
        zmax=1,
        color_continuous_scale="Viridis",
        labels=dict(x="block", y="step", color="probe score"),
        title=f"{variable.replace('_', ' ').capitalize()} probes at layer {layer}: score and selectivity",
    )
    fig.update_traces(text=text.values, texttemplate="%{text}")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig


def probe_curves(values: pd.DataFrame, layer: int | None = None, variable: str = "value") -> go.Figure:
    """Probe score of `variable` (with 95% CI) and control score across blocks, one line per step."""
    v, layer = probe_layer(values, layer, variable)
    if v.empty:
        return go.Figure().update_layout(title="No value probes could be fitted")
    v = v.sort_values("block")
    fig = go.Figure()
    for step, part in v.groupby("step"):
        fig.add_scatter(
            x=part["block"],
            y=part["score"],
            mode="lines+markers",
            name=f"step {step}",
            error_y=dict(
                type="data",
                symmetric=False,
                array=part["score_hi"] - part["score"],
                arrayminus=part["score"] - part["score_lo"],
            ),
        )
        fig.add_scatter(
            x=part["block"],
            y=part["control"],
            mode="lines",
            line=dict(dash="dot"),
            name=f"step {step} control",
        )
    fig.update_layout(
        title=f"Value probes at layer {layer}: score vs control task",
        xaxis_title="block",
        yaxis_title="score",
        yaxis_range=[0, 1.05],
    )
    return fig.update_xaxes(dtick=1)


def lens_top_tokens(table: pd.DataFrame, lens: str = "logit") -> go.Figure:
    """Top-1 token of the lens (and its probability) per layer x block, at the block-end slot."""
    t = table[(table["lens"] == lens) & (table["rank"] == 1)]
    if t.empty:
        return go.Figure()
    t = t[t["slot"] == t["slot"].max()]
    prob = t.pivot_table(index="layer", columns="block", values="prob", aggfunc="mean")
    token = t.pivot_table(index="layer", columns="block", values="token", aggfunc="first").reindex_like(prob)
    token = token.map(_plain_text)  # "<b>" would otherwise be read as bold markup
    fig = px.imshow(
        prob,
        aspect="auto",
        zmin=0,
        zmax=1,
        color_continuous_scale="Blues",
        labels=dict(x="block", y="layer", color="p(top-1)"),
        title=f"{lens.capitalize()} lens at the block-end slot: top token",
    )
    fig.update_traces(text=token.values, texttemplate="%{text}")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig


# -- single-example views (dashboard memory explorer and playground) ------------------------------
def _plain_text(text: object) -> str:
    """Text shown verbatim in a plotly label: its HTML-like markup (<b>, <br>...) escaped."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


ROLE_COLORS = {
    "question": "#aec7e8",
    "block begin": "#2ca02c",
    "memory": "#98df8a",
    "block end": "#1b7a1b",
    "readout": "#ffbb78",
    "pad": "#eeeeee",
}


def token_roles(
    tokens: Seq[str], roles: Seq[str], blocks: Seq[int] | None = None, title: str = "Prompt tokens by role"
) -> go.Figure:
    """The prompt as a strip of tokens coloured by role (question, block begin / memory / end, readout)."""
    names = list(ROLE_COLORS)
    codes = [names.index(r) if r in names else len(names) - 1 for r in roles]
    blocks = list(blocks) if blocks is not None else [0] * len(tokens)
    tokens = [_plain_text(t) for t in tokens]  # "<b>" would otherwise be read as bold markup
    hover = [
        f"#{i}: {t}<br>{r}" + (f", block {b}" if b else "")
        for i, (t, r, b) in enumerate(zip(tokens, roles, blocks))
    ]
    n = len(names)
    scale = [[v, ROLE_COLORS[name]] for i, name in enumerate(names) for v in (i / n, (i + 1) / n)]
    fig = go.Figure(
        go.Heatmap(
            z=[[c + 0.5 for c in codes]],
            zmin=0,
            zmax=n,
            colorscale=scale,
            showscale=False,
            xgap=2,
            text=[list(tokens)],
            texttemplate="%{text}",
            customdata=[hover],
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    for name in dict.fromkeys(roles):  # a legend entry per role present
        fig.add_scatter(
            x=[None],
            y=[None],
            mode="markers",
            marker=dict(size=12, color=ROLE_COLORS.get(name, "#eeeeee"), symbol="square"),
            name=name,
        )
    fig.update_layout(
        title=title,
        height=190,
        xaxis=dict(showgrid=False, zeroline=False),
        yaxis=dict(visible=False),
        legend=dict(orientation="h", y=-0.35),
        margin=dict(t=40, b=10, l=10, r=10),
        plot_bgcolor="white",
    )
    return fig


def block_readouts(table: pd.DataFrame, title: str = "Readout after each block") -> go.Figure:
    """What the model answers when read out after block k (columns block, readout, correct),
    green when it matches the gold answer."""
    colors = ["#2ca02c" if c else "#d62728" for c in table["correct"]]
    fig = go.Figure(
        go.Bar(
            x=table["block"],
            y=[1] * len(table),
            marker_color=colors,
            text=[_plain_text(r) or "(empty)" for r in table["readout"]],
            textposition="inside",
            insidetextanchor="middle",
            hovertemplate="block %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis=dict(title="block k", dtick=1),
        yaxis=dict(visible=False, range=[0, 1]),
        height=180,
        margin=dict(t=40, b=40, l=10, r=10),
    )
    return fig


def intervention_effect(
    table: pd.DataFrame, title: str = "Readout after each block: intact vs intervened"
) -> go.Figure:
    """Log-probability of the gold answer after each block, intact and under an intervention
    (columns block, logprob_before, logprob_after, readout_before, readout_after)."""
    fig = go.Figure()
    for when, color in (("before", "#1f77b4"), ("after", "#d62728")):
        fig.add_bar(
            x=table["block"],
            y=table[f"logprob_{when}"],
            name="intact" if when == "before" else "intervened",
            marker_color=color,
            text=[_plain_text(r) for r in table[f"readout_{when}"]],
            textposition="outside",
            hovertemplate="block %{x}<br>log p(gold) %{y:.3f}<br>readout %{text}<extra></extra>",
        )
    fig.update_layout(
        title=title, xaxis=dict(title="block k", dtick=1), yaxis_title="log p(gold answer)", barmode="group"
    )
    return fig


def iia_maps(part: pd.DataFrame, variable: str, title: str = "") -> go.Figure:
    """Heat maps of held-out IIA over layer x block for one variable, one per map basis (the
    primary basis and its placebo), at the slot chosen on training pairs; `part`: the rows of
    `abstraction.map_rows`, in basis order."""
    bases = list(dict.fromkeys(part["basis"]))
    fig = make_subplots(rows=1, cols=max(len(bases), 1), subplot_titles=bases, shared_yaxes=True)
    for i, basis in enumerate(bases, 1):
        cells = part[part["basis"] == basis]
        grid = cells.pivot_table(index="layer", columns="block", values="iia", aggfunc="max")
        slots = cells.pivot_table(index="layer", columns="block", values="slot", aggfunc="first")
        fig.add_trace(
            go.Heatmap(
                z=grid.values,
                x=[str(k) for k in grid.columns],
                y=[str(l) for l in grid.index],
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                text=np.round(grid.values, 2),
                texttemplate="%{text}",
                customdata=slots.reindex_like(grid).values,
                hovertemplate="layer %{y}, block %{x}, slot %{customdata}: IIA %{z:.3f}<extra></extra>",
                showscale=i == len(bases),
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="block", type="category", row=1, col=i)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    fig.update_layout(title=title or f"{variable}: interchange-intervention accuracy (held-out pairs)")
    return fig
