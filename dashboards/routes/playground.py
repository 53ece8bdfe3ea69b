"""The page at /playground (see dashboards/views/__init__.py)."""

from dashboards.ui import show

show("playground")
