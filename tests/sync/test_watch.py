"""``ff-sync watch`` in this process: passes in a loop, what it logs, and passes that fail.

The watcher as a service (SIGTERM from systemd, a cron beside it, a login node's tmux) runs in
subprocesses in tests/sync/test_hpc.py; these check the loop itself, quickly (fast tier).
"""

from __future__ import annotations

import dataclasses

import filelock

from formula_foundry.errors import EXIT_OK
from formula_foundry.sync import load_sync_settings
from formula_foundry.sync.commands.watch import watch
from formula_foundry.sync.engine.sync_state import LOCK_FILE

from .conftest import Project


def test_passes_until_max_passes_and_an_idle_pass_logs_nothing(project: Project) -> None:
    project.spool(
        """
        with tracker.start_run(run_name="w") as run:
            run.log_metric("loss", 0.5, step=1)
        """
    )
    lines: list[str] = []
    code = watch(load_sync_settings(project.config), 0.0, log=lines.append, max_passes=2)
    assert code == EXIT_OK
    assert lines[0].startswith(f"ff-sync watch: syncing {project.spool_root} -> sqlite:///")
    summaries = [line for line in lines if line.startswith("ff-sync: synced")]
    assert len(summaries) == 1 and "1 run" in summaries[0], lines  # the second pass was idle
    assert lines[-1] == "ff-sync watch: stopped after 2 passes"
    (run,) = project.snapshot()["runs"].values()
    assert run["status"] == "FINISHED"


def test_a_pass_that_finds_the_sync_locked_is_logged_and_the_watch_goes_on(
    project: Project,
) -> None:
    # Another ff-sync (a cron line beside the watcher) holds the destination's lock: each
    # pass says so and the watch goes on; once the lock is free, the next pass syncs.
    lines: list[str] = []
    settings = dataclasses.replace(load_sync_settings(project.config), sync_lock_timeout_s=0.1)
    assert watch(settings, 0.0, log=lines.append, max_passes=1) == EXIT_OK  # creates the state
    project.spool('tracker.start_run(run_name="w").end()')
    with filelock.FileLock(str(project.state_folder() / LOCK_FILE)):
        assert watch(settings, 0.0, log=lines.append, max_passes=2) == EXIT_OK
    locked = [line for line in lines if "another ff-sync is syncing" in line]
    assert len(locked) == 2 and all(
        line.endswith("retrying in the next interval") for line in locked
    )
    assert project.snapshot()["runs"] == {}
    assert watch(settings, 0.0, log=lines.append, max_passes=1) == EXIT_OK
    (run,) = project.snapshot()["runs"].values()
    assert run["status"] == "FINISHED"
