"""The sync notices a destination that is not the one its state describes, and a second state
folder syncing the same spool into the same store.

* a deleted SQLite store, or an older backup put back: the next pass says so (one warning
  naming the destination) and sends everything again — idle pass included; ``status``' check
  (``destination_problem``) says so without a pass; ``gc`` collects nothing meanwhile;
* another state folder (``sync.state_dir``) is refused with exit 2 naming the owner, until
  ``--replay`` takes over; a state folder deleted and recreated at the same place is not
  "another" (it resends everything, as it always did);
* a state file of schema 1 is migrated and claims its destination.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from formula_foundry.sync.engine.destination_id import destination_problem
from formula_foundry.sync.engine.sync_state import SCHEMA_VERSION, STATE_FILE

from .conftest import Destination, Project

RUN = """
import sys
with tracker.start_run(run_id=sys.argv[1], run_name=sys.argv[1]) as run:
    run.log_metric("x", 1.0, step=0)
    run.log_param("p", sys.argv[1])
"""


def _problem(project: Project) -> str | None:
    return destination_problem(project.uri, project.state_folder(), project.spool_root)


def test_a_deleted_store_is_noticed_and_filled_again(project: Project) -> None:
    project.spool(RUN, "lost-one")
    project.spool(RUN, "lost-two")
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    assert _problem(project) is None
    project.db.unlink()
    assert _problem(project) == f"destination lost: no store at {project.db}"
    status = project.ff_sync("status")  # no longer "all synced"
    assert f"problem:     destination lost: no store at {project.db}" in status.stdout
    as_json = orjson.loads(project.ff_sync("status", "--json").stdout)
    assert as_json["destinations"][0]["problem"] == f"destination lost: no store at {project.db}"

    report = project.sync()  # nothing new in the spool: the idle check sees the file gone
    assert not report.idle and report.runs == 2 and report.exit_code == 0
    lost = [w for w in report.warnings if "sending everything again" in w]
    assert lost == [
        f"destination {project.uri} is a new, empty store, but the sync state says runs were "
        "synced into it (lost?): sending everything again"
    ]
    assert project.snapshot() == reference
    assert project.sync().idle and _problem(project) is None


def test_an_older_backup_put_back_is_noticed_and_filled_again(project: Project) -> None:
    project.spool(RUN, "before-backup")
    assert project.ff_sync().returncode == 0
    backup = project.root / "backup.db"
    shutil.copy(project.db, backup)
    project.spool(RUN, "after-backup")
    assert project.ff_sync().returncode == 0
    reference = project.snapshot()
    shutil.copy(backup, project.db)
    assert "restored from an older copy" in (_problem(project) or "")

    result = project.ff_sync()
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "sending everything" in line]
    assert len(warnings) == 1 and "restored from a backup?" in warnings[0]
    assert project.snapshot() == reference
    assert "nothing new" in project.ff_sync().stdout


def test_gc_collects_nothing_while_the_store_is_lost(project: Project) -> None:
    project.spool(RUN, "gc-one")
    assert project.ff_sync().returncode == 0
    project.db.unlink()
    time.sleep(0.05)
    gc = project.ff_sync("gc", "--older-than", "0")
    assert gc.returncode == 0, gc.stderr
    assert "archived 0 run folders, kept 1" in gc.stdout
    assert f"destination lost: no store at {project.db}" in gc.stderr
    assert (project.spool_root / "gc-one").is_dir()
    assert project.ff_sync().returncode == 0  # filled again: now gc may collect
    gc = project.ff_sync("gc", "--older-than", "0")
    assert "archived 1 run folder, kept 0" in gc.stdout


def _second_state_dir(project: Project) -> Path:
    """A copy of the project's config whose sync.state_dir is another folder."""
    other = project.config.with_name("other.yaml")
    other.write_text(project.config.read_text().replace('"data/sync"', '"data/sync-other"'))
    return other


def test_a_second_state_folder_is_refused_until_replay_takes_over(
    project: Project, destination: Destination
) -> None:
    project.spool(RUN, f"owned-{destination.kind}")
    assert project.ff_sync().returncode == 0
    reference = project.snapshot()
    other = _second_state_dir(project)
    refused = project.ff_sync("--config", str(other))
    assert refused.returncode == 2, refused.stderr
    owner = str(project.state_folder())
    assert "from another sync state folder" in refused.stderr and owner in refused.stderr
    assert "ff-sync --replay" in refused.stderr
    assert not (project.root / "data" / "sync-other" / project.state_folder().name).exists()

    took = project.ff_sync("--config", str(other), "--replay")
    assert took.returncode == 0, took.stderr
    assert "taking over the spool" in took.stderr
    assert project.snapshot() == reference  # nothing duplicated
    # The first folder is now the second one: refused once it has something to send (into
    # SQLite even when idle; PostgreSQL and servers are checked by passes that open them).
    if destination.kind == "sqlite":
        old = project.ff_sync()
        assert old.returncode == 2 and "data/sync-other" in old.stderr
    project.spool(RUN, f"later-{destination.kind}")
    old = project.ff_sync()
    assert old.returncode == 2 and "data/sync-other" in old.stderr
    assert f"later-{destination.kind}" not in project.snapshot()["runs"]


def test_a_state_folder_deleted_and_recreated_resends_without_refusal(project: Project) -> None:
    project.spool(RUN, "recreated")
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    shutil.rmtree(project.state_dir)
    report = project.sync()
    assert report.exit_code == 0 and report.runs == 1 and not report.warnings
    assert project.snapshot() == reference


def test_a_state_of_schema_1_is_migrated_and_claims_its_destination(project: Project) -> None:
    project.spool(RUN, "migrated")
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    # What formula-foundry wrote before identities: no table meta, schema 1, no tags.
    state = sqlite3.connect(project.state_folder() / STATE_FILE)
    with state:
        state.execute("DROP TABLE meta")
        state.execute("PRAGMA user_version = 1")
    state.close()
    store = sqlite3.connect(project.db)
    with store:
        store.execute("DELETE FROM experiment_tags WHERE key LIKE 'ff.sync.%'")
    store.close()
    assert _problem(project) is None

    project.spool(RUN, "after-upgrade")
    report = project.sync()
    assert report.exit_code == 0 and report.runs == 1 and not report.warnings
    state = sqlite3.connect(project.state_folder() / STATE_FILE)
    assert state.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert {k for k, _ in state.execute("SELECT key, value FROM meta")} == {"id", "generation"}
    state.close()
    assert set(project.snapshot()["runs"]) == {*reference["runs"], "after-upgrade"}


@pytest.mark.parametrize("deleted", [False, True])
def test_identity_lives_on_default_or_its_fallback(project: Project, deleted: bool) -> None:
    from mlflow import MlflowClient

    project.spool(RUN, "fallback")
    assert project.sync().exit_code == 0
    if deleted:  # the Default experiment deleted: a fallback experiment keeps the identity
        MlflowClient(tracking_uri=project.uri).delete_experiment("0")
    project.spool(RUN, "fallback-later")
    report = project.sync()
    assert report.exit_code == 0 and report.runs == (2 if deleted else 1)
    assert project.sync().idle and _problem(project) is None
    exps = {e.name for e in MlflowClient(tracking_uri=project.uri).search_experiments()}
    assert ("ff-sync-identity" in exps) is deleted
    assert "ff-sync-identity" not in project.snapshot()["experiments"]
