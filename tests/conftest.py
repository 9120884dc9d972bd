"""Fixtures shared by every test package: an isolated project and a clean environment.

Package-specific fixtures live in ``tests/<package>/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests._proc import CONFIG_ENV_VARS

REPO_ROOT = Path(__file__).resolve().parent.parent


# The fast tier (marker ``fast``; ``./tools/test.sh --fast``, under 2 minutes here): the
# tracker, the substrate, the replay engine against an in-memory destination
# (tests/memory_sink.py), and one quick file per remaining part (CLI, watch, status,
# quarantine, gc, verify, the REST path, the MLflow drop-in). Every module of src/ runs in it;
# the full suite stays the CI gate.
FAST: tuple[str, ...] = (
    "tests/tracking/",
    "tests/substrate/",
    "tests/test_ids.py",
    "tests/test_redact.py",
    "tests/test_docs_cli.py",
    "tests/test_docs_tracker.py",
    "tests/sync/test_engine_memory.py",
    "tests/sync/test_fast_path.py",
    "tests/sync/test_scheduler.py",
    "tests/sync/test_watch.py",
    "tests/sync/test_run_context.py",
    "tests/test_architecture.py",
    "tests/sync/test_store_access.py",
    "tests/sync/test_cli.py",
    "tests/sync/test_status.py",
    "tests/sync/test_rest_batch.py",
    "tests/sync/test_quarantine.py",
    "tests/sync/test_gc_lagging.py",
    "tests/sync/test_verify.py::test_a_clean_sync_verifies",
    "tests/sync/test_tail.py",
    "tests/sync/test_console_sync.py",
    "tests/dropin/test_store.py",
    "tests/dropin/test_artifacts.py::test_client_calls_in_process_log_list_and_download",
    "tests/dropin/test_artifacts.py::test_artifact_uris_split_at_the_run_folder_whatever_the_paths_hold",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(FAST):
            item.add_marker(pytest.mark.fast)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove the configuration environment variables; returns ``monkeypatch`` to set some."""
    for name in CONFIG_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def write_config() -> Callable[[Path, str], Path]:
    """Write ``<root>/config/mlflow.yaml`` with the given text; return the file's path."""

    def write(root: Path, text: str) -> Path:
        path = root / "config" / "mlflow.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def ff_project(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, write_config: Callable[[Path, str], Path]
) -> Path:
    """A project root under tmp_path holding the repository's documented config/mlflow.yaml,
    made the working directory, with no configuration variable set."""
    root = tmp_path / "project"
    root.mkdir()
    write_config(root, (REPO_ROOT / "config" / "mlflow.yaml").read_text(encoding="utf-8"))
    clean_env.chdir(root)
    return root
