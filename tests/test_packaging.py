"""Packaging: every third-party import is declared, the version is printed, the library imports
without `fcntl`, and the licence is the one pyproject.toml names."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib

from conftest import REPO

from rim_lens import __version__
from rim_lens.cli import main

FIRST_PARTY = {"rim_lens", "training", "dashboards"}


def imported_modules() -> dict[str, str]:
    """Top-level module name -> the first file importing it, over rim_lens/, training/, dashboards/."""
    found: dict[str, str] = {}
    for folder in sorted(FIRST_PARTY):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distribution names in [project] dependencies and every optional extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [
        *project["dependencies"],
        *(s for extra in project["optional-dependencies"].values() for s in extra),
    ]
    return {normalise(re.match(r"[A-Za-z0-9_.\-]+", spec).group()) for spec in specs}


def test_every_third_party_import_is_declared():
    distributions = metadata.packages_distributions()
    third_party = {
        module: where
        for module, where in imported_modules().items()
        if module not in FIRST_PARTY and module not in sys.stdlib_module_names
    }
    assert {"torch", "sklearn", "scipy", "filelock"} <= set(third_party)  # the scan sees imports
    missing = []
    for module, where in sorted(third_party.items()):
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & declared():
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(names))})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rim-lens {__version__}"
    assert metadata.version("rim-lens") == __version__  # pyproject reads it from rim_lens.__version__


def test_the_library_imports_without_fcntl():
    code = "import sys; sys.modules['fcntl'] = None; import rim_lens.analysis.lab, rim_lens.runs"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_licence_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
