"""Methods and analyses defined outside rim-lens: the modules that register them, imported once.

A package lists its modules under the `rim_lens.plugins` entry-point group; for a module that is
not installed, `RIM_LENS_PLUGINS` holds comma-separated module names (on `sys.path`). Importing a
module registers what it defines (`methods.register`, `analysis.registry.analysis`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from rim_lens.errors import ConfigError

ENV = "RIM_LENS_PLUGINS"
GROUP = "rim_lens.plugins"
_loaded: set[str] = set()


def modules() -> list[str]:
    """The plugin modules named by the entry points and by RIM_LENS_PLUGINS."""
    return [
        *_installed(tuple(sys.path)),
        *(m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()),
    ]


@functools.cache
def _installed(path: tuple[str, ...]) -> list[str]:
    """The modules of the `rim_lens.plugins` entry points on `path` (scanned once per path)."""
    return [ep.value.partition(":")[0] for ep in entry_points(group=GROUP)]


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
