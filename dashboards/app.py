"""rim-lens dashboard: `rim-lens dashboard [RUNS_DIR]`, or
`streamlit run dashboards/app.py -- --runs RUNS_DIR` (the RIM_LENS_RUNS variable also sets it).

Pages (one module each in `dashboards/views/`): Runs, Memory explorer, Probes, Causal, Playground,
each at its own URL through `st.navigation` (so the browser's back button and links work).
It reads run directories under the runs root only, and writes (under a run's analysis/) only
when an analysis is started here.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards import core
from dashboards.ui import CONTEXT, Context
from dashboards.views import PAGES

SCRIPTS = Path(__file__).parent / "routes"


def main() -> None:
    st.set_page_config(page_title="rim-lens", page_icon="🧠", layout="wide")
    pages = [
        st.Page(SCRIPTS / f"{path}.py", title=title, url_path=path, default=i == 0)
        for i, (title, (path, _)) in enumerate(PAGES.items())
    ]
    page = st.navigation(pages)
    root = core.Root.of(core.runs_argument())
    st.sidebar.title("rim-lens")
    st.sidebar.caption("Reasoning in Memory: do the memory blocks carry the reasoning?")
    st.sidebar.caption(f"Runs root: `{root.shown}`")

    if not root.path.exists():
        st.error(
            f"The runs directory {root.shown} does not exist ({root.path}). "
            "Train RiM and its baselines into it with:"
        )
        core.command(f"rim-lens demo --runs-dir {root.shown}/demo")
        st.caption("or start the dashboard on another folder: `rim-lens dashboard RUNS_DIR`.")
        return
    if not root.path.is_dir():
        st.error(
            f"{root.shown} is not a directory; give the folder that holds the runs: `rim-lens dashboard "
            "RUNS_DIR`."
        )
        return
    runs, refused = core.discover(root)
    for message in refused:
        st.sidebar.warning(message)

    picked = None
    typed = st.sidebar.text_input(
        "Open a run by path (relative to the runs root)", key="run_path", placeholder="demo/rim"
    ) or st.query_params.get("run", "")
    if typed:
        try:
            picked = core.open_by_path(root, typed)
        except core.OutsideRoot as err:
            st.sidebar.error(str(err))
            st.error(f"Refused: {err}")
        except Exception as err:  # noqa: BLE001 - shown as one line
            st.sidebar.error(str(err))

    if not runs and picked is None:
        st.warning(
            f"No runs under {root.shown} ({root.path}): no folder with config.yaml or model/. Create some "
            "with:"
        )
        core.command(f"rim-lens demo --runs-dir {root.shown}/demo")
        return
    st.session_state[CONTEXT] = Context(root, runs, picked, read_only=core.read_only_argument())
    page.run()


main()
