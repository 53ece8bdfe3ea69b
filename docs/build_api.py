"""Build the HTML API reference from the docstrings (`make docs`): pdoc over every module of
`rim_lens` and `training` into docs/api/. Any warning pdoc gives (an unresolvable reference, a
module that fails to import) fails the build, naming it."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from pathlib import Path

import pdoc

import rim_lens
import training

OUT = Path(__file__).parent / "api"


def modules() -> list[str]:
    """The two packages, and every module pdoc would not find by itself: one whose package names
    its public objects in `__all__` (as `rim_lens` does), which pdoc then reads as the whole
    contents. `__main__` entry points are not documented."""
    names = ["rim_lens", "training"]
    for package in (rim_lens, training):
        for found in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            parent = importlib.import_module(found.name.rpartition(".")[0])
            if hasattr(parent, "__all__") and not found.name.endswith("__main__"):
                names.append(found.name)
    return names


def main() -> int:
    pdoc.render.configure(docformat="markdown", footer_text=f"rim-lens {rim_lens.__version__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules(), output_directory=OUT)
    found = [w for w in caught if "pdoc" in Path(w.filename).parts or "pdoc" in str(w.message)[:5]]
    for w in found:
        print(f"make docs: pdoc warned: {w.message}", file=sys.stderr)
    print(f"API reference: {OUT / 'index.html'} ({len(list(OUT.rglob('*.html')))} pages)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
