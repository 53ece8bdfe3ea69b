"""The page at /runs (see dashboards/views/__init__.py)."""

from dashboards.ui import show

show("runs")
