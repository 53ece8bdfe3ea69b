"""Methods and analyses defined outside rim-lens: the modules that register them, imported once.

A package lists its modules under the `rim_lens.plugins` entry-point group; for a module that is
not installed, `RIM_LENS_PLUGINS` holds comma-separated module names (on `sys.path`). Importing a
module registers what it defines (`methods.register`, `analysis.registry.analysis`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from importlib.metadata import entry_points

from rim_lens.errors import ConfigError

ENV = "RIM_LENS_PLUGINS"
GROUP = "rim_lens.plugins"
_loaded: set[str] = set()


def modules() -> list[str]:
    """The plugin modules named by the entry points and by RIM_LENS_PLUGINS."""
    named = [ep.value.partition(":")[0] for ep in entry_points(group=GROUP)]
    return named + [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def load(built_in: Sequence[str] = ()) -> None:
    """Import `built_in` (rim-lens's own modules that declare things) and every plugin module not
    imported yet; ConfigError naming one that cannot be."""
    for name in [*built_in, *modules()]:
        if name in _loaded:
            continue
        _loaded.add(name)
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{ENV} or entry point {GROUP}: cannot import {name!r} ({err})") from None
