"""Every analysis, declared once where it is defined: `@analysis(...)` on its function.

A declaration names the analysis (`rim-lens analyze NAME`, and `Lab.NAME` for one outside the
Lab), the artefact stems it writes under `RUN/analysis/`, an example, and help for its options;
the command line derives its options from the function's signature (`options`). Built-in
analyses are `Lab` methods; a module outside rim-lens declares a function of a `Session` and
is found through `rim_lens.plugins`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rim_lens import plugins
from rim_lens.errors import RunError

# What the command line shows for an option every analysis may take.
COMMON_HELP = {
    "layers": "layers, e.g. 0,2-3 (default: all)",
    "blocks": "blocks (1-based), e.g. 1-4 (default: all)",
    "slots": "slots in a block, 0..M+1 (default: all)",
    "seed": "seed of the analysis's random choices (default: 0)",
}


@dataclass(frozen=True)
class Analysis:
    """One analysis: `function(subject, **options)` returns its result. `subject` is a `Session`
    (a `Lab`), or with `on_run` the run directory (analyses that open several models)."""

    name: str
    function: Callable[..., Any]
    stems: tuple[str, ...] = ()  # what it writes: `<stem>.parquet`, `<stem>.json`, `<stem>.<figure>.fig.json`
    example: str = ""  # the arguments after RUN in the help's example
    help: Mapping[str, str] = field(default_factory=dict)  # per option
    choices: Mapping[str, tuple] = field(default_factory=dict)  # per option
    cli: Mapping[str, Any] = field(default_factory=dict)  # options the command line fixes
    flags: Mapping[str, str] = field(default_factory=dict)  # parameter -> its flag, where they differ
    on_run: bool = False
    show: Callable[[Any], str] | None = None  # with `on_run`: what the command line prints of its result

    @property
    def summary(self) -> str:
        """The first sentence of the function's docstring."""
        first = " ".join((inspect.getdoc(self.function) or self.name).split("\n\n")[0].split())
        return re.split(r"(?<=\.)\s", first, maxsplit=1)[0].rstrip(".")

    def parameters(self) -> list[inspect.Parameter]:
        """The options the command line offers: the function's keyword parameters that a command
        line can give (numbers, text, flags, lists of integers), minus those it fixes."""
        params = list(inspect.signature(self.function).parameters.values())[1:]
        return [p for p in params if p.name not in self.cli and kind_of(p) is not None]


_REGISTRY: dict[str, Analysis] = {}
# Where rim-lens's own analyses are declared: the Lab's methods, then those over whole runs. They
# load like plugins, by name, because they sit above this module.
BUILT_IN = ("rim_lens.analysis.lab", "rim_lens.analysis.report", "rim_lens.analysis.calibration")


def analysis(name: str | None = None, **declared: Any) -> Callable[[Callable], Callable]:
    """Register the decorated function as the analysis `name` (default: the function's name)."""

    def register(function: Callable) -> Callable:
        found = Analysis(name or function.__name__, function, **declared)
        if found.name in _REGISTRY and _REGISTRY[found.name].function is not function:
            raise ValueError(f"analysis {found.name!r} is declared twice")
        _REGISTRY[found.name] = found
        return function

    return register


def analyses() -> dict[str, Analysis]:
    """Every declared analysis by name: the built-in ones (the Lab's), then the plugins'."""
    plugins.load(BUILT_IN)
    return dict(_REGISTRY)


def get_analysis(name: str) -> Analysis:
    """The analysis called `name`; RunError naming the known ones if there is none."""
    found = analyses()
    if name not in found:
        raise RunError(f"unknown analysis {name!r}; choose one of {', '.join(found)}")
    return found[name]


def analysis_of(stem: str) -> str:
    """The analysis that writes the table (or summary, figure) with this stem, e.g. probe_values -> probe."""
    return next((a.name for a in analyses().values() if stem in a.stems), stem)


def kind_of(param: inspect.Parameter) -> str | None:
    """How the command line reads a parameter, from its annotation: "flag", "ints" (a list such as
    1,3-4 or `all`), "int", "float", "text", or None for what a command line cannot give (an
    intervention, examples, sites)."""
    note = param.annotation  # text under `from __future__ import annotations`, else the type itself
    note = note.__name__ if isinstance(note, type) else str(note)
    note = re.sub(r"collections\.abc\.|typing\.|\s", "", note)
    if note == "bool":
        return "flag"
    if note == "Layers" or note.startswith("int|Sequence[int]") or note == "Sequence[int]|None":
        return "ints"
    if note in ("int", "int|None"):
        return "int"
    if note in ("float", "float|None"):
        return "float"
    if re.fullmatch(r"str(\|Path)?(\|Sequence\[str\])?(\|None)?|str\|Intervention", note):
        return "text"
    return None
