"""Modules a reader can hold (issue 23): the size limits, computed from the source."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE = 600  # lines of a module in rim_lens/ or training/
LONG, MAX_FUNCTION = 60, 90  # lines of a function: "long", and the most any may have
# Functions over LONG lines outside bench/ and tests/: issue 23's bar (none are, today).
MAX_LONG = 10


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def functions() -> dict[str, int]:
    """Lines of every function outside bench/ and tests/, by path:name."""
    found = {}
    for path in sources("rim_lens", "training", "dashboards"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found[f"{path.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return found


def test_no_module_is_over_600_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in sources("rim_lens", "training")
    }
    assert len(sizes) > 50
    assert not {path: n for path, n in sizes.items() if n > MAX_MODULE}


def test_functions_stay_short():
    sizes = functions()
    assert not {name: n for name, n in sizes.items() if n > MAX_FUNCTION}
    long = sorted((n, name) for name, n in sizes.items() if n > LONG)
    assert len(long) <= MAX_LONG, long


def test_run_stage_takes_at_most_five_parameters():
    from training.stages import run_stage

    assert len(inspect.signature(run_stage).parameters) <= 5


def test_one_grouped_bootstrap():
    """Resampling whole groups (a question's rows) is written once, in stats.py."""
    resampling = re.compile(r"\bdef \w*bootstrap\w*\(|\.multinomial\(")
    found = [
        str(p.relative_to(REPO))
        for p in sources("rim_lens", "training", "dashboards")
        if resampling.search(p.read_text())
    ]
    assert found == ["rim_lens/stats.py"]
