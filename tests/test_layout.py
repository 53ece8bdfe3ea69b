"""The package reads as the pipeline: no import cycles inside rim_lens (imports under `TYPE_CHECKING`
count: a reader follows them too), and nothing in rim_lens but its command line imports `training`
or `dashboards` (the library never depends on its callers)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rim_lens"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module `name` imports, at any depth in its code: function-level imports and those under
    `if TYPE_CHECKING:` too."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return found


def test_no_import_cycles_inside_rim_lens():
    graph = {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}
    assert len(graph) > 30 and "rim_lens.analysis.lab" in graph["rim_lens.analysis.report"]
    # Analyses take a session from below; only what composes them (report, calibration, the CLI)
    # imports the Lab.
    assert "rim_lens.analysis.session" in graph["rim_lens.analysis.causal"]
    done, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_imports_training_or_dashboards():
    offenders = {
        name: sorted(m for m in imports(name) if m.split(".")[0] in ("training", "dashboards"))
        for name in MODULES
        if not name.startswith("rim_lens.cli")
    }
    assert not {k: v for k, v in offenders.items() if v}
    # ... and the CLI does (the check looks at real imports).
    assert any(m.startswith("training") for m in imports("rim_lens.cli.train"))


def test_no_private_helpers_used_outside_their_module():
    """Benches, tests and the dashboard use the analysis library's public names only."""
    for folder in ("bench", "dashboards", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rim_lens.analysis"):
                    assert not [a.name for a in node.names if a.name.startswith("_")], (path, node.module)
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    owner = ast.unparse(node.value)
                    assert owner.split(".")[0] not in ("iv", "rl", "rim_lens", "lab", "causal", "engine"), (
                        f"{path.relative_to(REPO)}: {owner}.{node.attr}"
                    )
