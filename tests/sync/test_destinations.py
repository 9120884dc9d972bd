"""Other destinations than SQLite: PostgreSQL and an ``mlflow server`` give the same runs.

The servers are real (``tests/_services.py`` starts a throw-away PostgreSQL cluster and an
``mlflow server`` on 127.0.0.1, or uses ``FF_TEST_POSTGRES_URI`` /
``FF_TEST_MLFLOW_SERVER_URI``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests._services import create_database, mlflow_server, postgres_cluster

from .conftest import RICH_SPOOL, Project


def _comparable(snap: dict[str, Any]) -> dict[str, Any]:
    """What must match across store kinds (artifact locations differ by design)."""
    runs = snap["runs"]
    return {"duplicates": snap["duplicates"], "runs": runs}


def _sync_twice_and_compare(project: Project, uri: str) -> None:
    project.spool(RICH_SPOOL, "300")
    assert project.sync().exit_code == 0  # the SQLite reference
    reference = project.snapshot()
    result = project.ff_sync("--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ff-sync: synced: 3 runs, ")
    assert "***" in result.stdout or "@" not in uri
    assert _comparable(project.snapshot(uri)) == _comparable(reference)
    again = project.ff_sync("--tracking-uri", uri)
    assert again.returncode == 0 and "nothing new: 0 runs, 0 events" in again.stdout


@pytest.mark.postgres
def test_postgresql_destination(project: Project) -> None:
    with postgres_cluster() as admin:
        uri = create_database(admin)
        # A password in the URI never shows (trust auth ignores it).
        uri = uri.replace("postgresql://postgres@", "postgresql://postgres:pw-secret@")
        _sync_twice_and_compare(project, uri)


@pytest.mark.server
def test_mlflow_server_destination(project: Project, tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "server") as (uri, _pid):
        _sync_twice_and_compare(project, uri)
