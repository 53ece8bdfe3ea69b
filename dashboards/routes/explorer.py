"""The page at /explorer (see dashboards/views/__init__.py)."""

from dashboards.ui import show

show("explorer")
