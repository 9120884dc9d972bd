"""Other destinations than SQLite: PostgreSQL and an ``mlflow server`` give the same runs.

The servers are real: the session's PostgreSQL cluster and ``mlflow server`` of
``conftest.py`` (``tests/_services.py`` starts them on 127.0.0.1, or uses
``FF_TEST_POSTGRES_URI`` / ``FF_TEST_MLFLOW_SERVER_URI``). The correctness tests themselves
(crash, live runs, outage, quarantine, resume) run on every destination through the
``destination`` fixture; here: a sync into SQLite and a replay of the same spools into the
other store hold the same thing.
"""

from __future__ import annotations

import pytest

from .conftest import RICH_SPOOL, HttpService, PgService, Project, comparable, snapshot_of_runs


def _sync_twice_and_compare(project: Project, uri: str, shared: bool = False) -> None:
    """Sync into SQLite, then replay the same spools into ``uri``: the stores hold the same
    thing (snapshots equal, ``ff-sync verify`` clean on both); a second pass into ``uri`` has
    nothing to do."""
    project.spool(RICH_SPOOL, "300")
    assert project.sync().exit_code == 0  # the SQLite reference
    reference = project.snapshot()
    result = project.ff_sync("--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ff-sync: synced: 3 runs, ")
    assert "***" in result.stdout or "@" not in uri
    if shared:  # the session's server: this test's runs and their experiments
        got = snapshot_of_runs(uri, project.own_runs())
        used = {run["experiment"] for run in reference["runs"].values()}
        reference["experiments"] = {
            k: v for k, v in reference["experiments"].items() if k in used
        }  # the shared server's other experiments (its "Default" too) are not this test's
        reference["untracked_runs"] = 0
    else:
        got = project.snapshot(uri)
    assert comparable(got) == comparable(reference)
    assert got == reference  # experiments (names, stages, tags) too
    again = project.ff_sync("--tracking-uri", uri)
    assert again.returncode == 0 and "nothing new: 0 runs, 0 events" in again.stdout
    # ff-sync verify agrees: both stores hold exactly what the spools say.
    for store in (project.uri, uri):
        verified = project.ff_sync("--tracking-uri", store, "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.postgres
def test_postgresql_destination(project: Project, pg_service: PgService) -> None:
    uri = pg_service.database()
    # A password in the URI never shows (trust auth ignores it).
    uri = uri.replace("postgresql://postgres@", "postgresql://postgres:pw-secret@")
    _sync_twice_and_compare(project, uri)


@pytest.mark.server
def test_mlflow_server_destination(project: Project, http_service: HttpService) -> None:
    _sync_twice_and_compare(project, http_service.uri, shared=True)
