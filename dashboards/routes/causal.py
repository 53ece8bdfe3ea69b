"""The page at /causal (see dashboards/views/__init__.py)."""

from dashboards.ui import show

show("causal")
