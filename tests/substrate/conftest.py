"""Shared fixtures of the substrate tests: real stores and files under tmp_path, real processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from formula_foundry.substrate import ArtifactStore
from tests._proc import run_python as shared_run_python

RunPython = Callable[..., subprocess.CompletedProcess[str]]

# A fixed, fake installed-distribution list: fingerprints must not depend on the test venv.
CONTROLLED_DISTRIBUTIONS: tuple[tuple[str, str], ...] = (
    ("orjson", "3.10.0"),
    ("numpy", "2.0.0"),
    ("Formula_Foundry", "0.1.0"),
)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    """A fresh artifact store under tmp_path."""
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def distributions() -> list[tuple[str, str]]:
    """The controlled distribution list (a fresh copy each test)."""
    return list(CONTROLLED_DISTRIBUTIONS)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root (has config/ and docs/design.md) that is the cwd, outside any git repo."""
    root = tmp_path / "project"
    (root / "config").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "docs" / "design.md").write_text("# Design\n\nCoupons are built from formulas.\n")
    monkeypatch.chdir(root)
    monkeypatch.delenv("FF_DESIGN_DOC", raising=False)
    return root


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """Undo any os.environ change the test (e.g. DeterminismConfig.apply) makes."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def run_python() -> RunPython:
    """Run a Python snippet in a fresh interpreter of this venv; fails the test on error."""
    return shared_run_python
