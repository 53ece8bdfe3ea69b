"""The dashboard's pages, one module each: a page is a function of the `ui.Context`."""

from dashboards.views import causal, explorer, playground, probes, runs

PAGES = {
    "Runs": runs.page,
    "Memory explorer": explorer.page,
    "Probes": probes.page,
    "Causal": causal.page,
    "Playground": playground.page,
}
