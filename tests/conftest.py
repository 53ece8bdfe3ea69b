"""Shared fixtures: the reference data shipped in data/ and small thread counts for 2-core machines."""

from __future__ import annotations

from pathlib import Path

import pytest

# Fixtures whose value is a trained model. A test that uses one (directly or through another
# fixture) rides on a training trajectory, which rounds differently on another CPU: it is marked
# `trained`, and `make test-portable` reruns these with the CPU kernels limited to AVX2.
TRAINED_FIXTURES = {"tiny_runs", "tiny_modchain_runs", "coconut_run", "runs"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trained)


REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """The repo's data/ folder (GSM8K, multiplication, ProsQA; see data/README.md). It ships with
    the repo, so a test that needs it fails, never skips, if it is missing."""
    assert (DATA / "README.md").is_file(), f"{DATA} is missing: the repo ships its reference data"
    return DATA


@pytest.fixture
def no_progress_bars():
    """Hugging Face's "Loading weights" bar goes to stderr once some earlier test in the session
    has trained (it does not show in a fresh `rim-lens` process); keep it out of checks that
    expect exactly one error line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


# Tiny trained runs (copy task and modchain), trained once per session: see tests/fixtures.py.
from fixtures import (  # noqa: E402,F401
    tiny_modchain_runs,
    tiny_modchain_runs_copy,
    tiny_runs,
    tiny_runs_copy,
)
