"""Shared fixtures: the offline reference data and small thread counts for 2-core machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    candidates = [
        os.environ.get("RIM_LENS_SHARED_DATA"),
        REPO.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for c in candidates:
        if c and (Path(c) / "README.md").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if path is None:
        pytest.skip("../shared/data not found (set RIM_LENS_SHARED_DATA)")
    return path


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
