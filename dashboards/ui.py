"""Widgets every page shares: the page context, charts, the run picker, the example picker, and the
button that runs an analysis. What to compute lives in `rim_lens`; pages only render it."""

from __future__ import annotations

import html
from dataclasses import dataclass

import streamlit as st

from dashboards import core
from dashboards.core import Root, RunInfo, command, section
from rim_lens.errors import RimLensError

READ_ONLY = (
    "Read-only dashboard (served beyond this machine without --allow-actions): run the command instead."
)


@dataclass
class Context:
    root: Root
    runs: list[RunInfo]
    picked: RunInfo | None = None  # a run named by path (sidebar or ?run=)
    read_only: bool = False  # `rim-lens dashboard` on a non-loopback host: no analysis may be started

    def block_runs(self, methods: tuple[str, ...] | None = None) -> list[RunInfo]:
        """The runs whose method is one of `methods` (default: those with memory blocks)."""
        runs = [r for r in self.runs if core.uses_blocks(self.root, r, methods)]
        picked = self.picked
        if picked is not None and picked not in runs and core.uses_blocks(self.root, picked, methods):
            runs.insert(0, picked)
        return runs


CONTEXT = "rim_lens.context"  # where app.py leaves this session's Context for the page scripts


def show(url_path: str) -> None:
    """Render the page served at `url_path` with the context app.py made for this run of the script."""
    from dashboards.views import PAGES

    title, page = next((title, page) for title, (path, page) in PAGES.items() if path == url_path)
    with section(title):
        page(st.session_state[CONTEXT])


def chart(fig, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


def esc(text: object) -> str:
    """Text for a plotly title or label, shown verbatim: memory tokens like <b> are not markup."""
    return html.escape(str(text), quote=False)


def choose(
    ctx: Context, candidates: list[RunInfo], key: str, label: str = "Run", prefer: str = "rim"
) -> RunInfo | None:
    """A run picker over `candidates`; the run named by path (if any) comes first, else one
    called `prefer`."""
    if not candidates:
        st.warning(
            f"No run with memory blocks (rim or pause) under {ctx.root.shown}. "
            "Train RiM and its baselines with:"
        )
        command(f"rim-lens demo --runs-dir {ctx.root.shown}/demo")
        return None
    names = [r.name for r in candidates]
    if ctx.picked is not None and ctx.picked in candidates:
        index = candidates.index(ctx.picked)
        if st.session_state.get(f"{key}.picked") != ctx.picked.name:  # a newly named run wins
            st.session_state[f"{key}.picked"] = st.session_state[key] = ctx.picked.name
    else:
        index = next((i for i, r in enumerate(candidates) if r.path.name == prefer), 0)
    if st.session_state.get(key) not in names:
        st.session_state.pop(key, None)  # the run it held is gone
    # With a value in the session state the index is ignored; 0 keeps Streamlit from warning about it.
    name = st.selectbox(label, names, index=index if key not in st.session_state else 0, key=key)
    return candidates[names.index(name)]


def block_run(ctx: Context, key: str):
    """(run, Lab) of a run with memory blocks picked in the page, or (run or None, None) after
    saying why there is none to use."""
    run = choose(ctx, ctx.block_runs(), key)
    if run is None:
        return None, None
    with section(f"cannot load {run.shown}"):
        return run, core.lab(ctx.root, run)
    return run, None


def pick_example(lab, key: str):
    """A held-out example, or one computed from a typed question (synthetic tasks)."""
    source = st.radio(
        "Example", ["held-out example", "type a question"], horizontal=True, key=f"{key}.source"
    )
    if source == "held-out example":
        if not lab.examples:
            st.warning(f"{lab.source} holds no examples.")
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


def analysis_button(ctx: Context, run: RunInfo, what: str, label: str) -> None:
    """A button that runs `rim-lens analyze WHAT` on the run's test split and saves it (analysis/)."""
    n = st.number_input(
        "Held-out examples to use", min_value=8, max_value=5000, value=200, step=8, key=f"{what}.n.{run.name}"
    )
    if ctx.read_only:
        st.caption(READ_ONLY)
    if st.button(label, key=f"{what}.go.{run.name}", disabled=ctx.read_only):
        from rim_lens.analysis.lab import Lab

        with (
            section(f"rim-lens analyze {what}"),
            st.spinner(f"Running `rim-lens analyze {what} {run.shown} --n {n}`…"),
        ):
            core.check_tree(ctx.root, run.path)
            lab = Lab.open(run.path, backend="hf", n=int(n))
            getattr(lab, what)().save(lab.out)
            st.success(f"Wrote {run.shown}/analysis/.")
            st.rerun()
