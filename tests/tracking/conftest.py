"""Fixtures of the tracking tests: a tracker spooling into an isolated project."""

from __future__ import annotations

from pathlib import Path

import pytest

from formula_foundry.tracking import Tracker, get_tracker


@pytest.fixture
def tracker(ff_project: Path) -> Tracker:
    """The tracker of a fresh project (documented default config, spool under data/runs)."""
    return get_tracker()


@pytest.fixture
def spool_root(tracker: Tracker) -> Path:
    return tracker.settings.spool_root
