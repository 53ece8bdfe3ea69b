"""The docs: a README a new user reads (short, a Python block near the top), every number of the
results it used to hold kept in docs/results.md, and no broken link between the pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NUMBER = r"\d+(?:[.,]\d+)*"


def test_the_readme_is_a_short_user_guide():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200 and len(text.encode()) <= 15_000
    first = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    assert first < 60
    headings = [line[3:] for line in lines if line.startswith("## ")]
    assert headings == [
        "Install",
        "Quick start",
        "Command line",
        "Your own model",
        "Headline results",
        "Links",
    ]
    assert "pip install -e ." in text and "\nmake " in text
    quick = text[text.index("```python") : text.index("```", text.index("```python") + 3)]
    for call in ("rl.Lab.open(", ".ablate(", ".patch(", ".decode(rl.Patch(", ".effect("):
        assert call in quick, call
    assert len(quick.splitlines()) - 1 <= 10


def test_every_number_of_the_old_result_sections_is_in_results_md():
    """tests/data/readme_3b606cd_numbers.txt lists them (how it was made is in its header)."""
    listed = (REPO / "tests" / "data" / "readme_3b606cd_numbers.txt").read_text().splitlines()
    numbers = [line for line in listed if line and not line.startswith("#")]
    assert len(numbers) == 428
    present = set(re.findall(NUMBER, (REPO / "docs" / "results.md").read_text()))
    missing = [n for n in numbers if n not in present]
    assert not missing, f"numbers of the old README's results missing from docs/results.md: {missing[:20]}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if fragment and linked.suffix == ".md":
            headings = [line.lstrip("#") for line in linked.read_text().splitlines() if line.startswith("#")]
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: {target}"
