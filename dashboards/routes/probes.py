"""The page at /probes (see dashboards/views/__init__.py)."""

from dashboards.ui import show

show("probes")
