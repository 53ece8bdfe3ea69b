"""The dashboard's pages, one module each: a page is a function of the `ui.Context`.

`PAGES` lists them once: title -> (URL path, page function). Each is served at its own URL
(`/runs`, `/explorer`, ...) by `st.navigation` through a two-line script in `dashboards/routes/`.
"""

from dashboards.views import causal, explorer, playground, probes, runs

PAGES = {
    "Runs": ("runs", runs.page),
    "Memory explorer": ("explorer", explorer.page),
    "Probes": ("probes", probes.page),
    "Causal": ("causal", causal.page),
    "Playground": ("playground", playground.page),
}
