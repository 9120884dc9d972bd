"""gc names a destination that holds runs back, instead of keeping them forever in silence."""

from __future__ import annotations

from pathlib import Path

from tests.sync.conftest import Project

RUN = """
import sys
with tracker.start_run(run_id=sys.argv[1], run_name=sys.argv[1]) as run:
    run.log_metric("x", 1.0, step=0)
"""


def test_gc_names_a_destination_that_lags_behind(project: Project, tmp_path: Path) -> None:
    one_off = f"sqlite:///{tmp_path / 'one-off.db'}"
    project.spool(RUN, "first")
    assert project.ff_sync().returncode == 0
    assert project.ff_sync("--tracking-uri", one_off).returncode == 0  # a one-off check
    project.spool(RUN, "second")
    assert project.ff_sync().returncode == 0  # only the main destination gets it

    gc = project.ff_sync("gc", "--older-than", "0")
    assert gc.returncode == 0, gc.stderr
    assert "archived 1 run folder, kept 1" in gc.stdout
    assert not (project.spool_root / "first").exists()
    assert (project.spool_root / "second").is_dir()
    lines = [line for line in gc.stderr.splitlines() if "has not synced" in line]
    assert len(lines) == 1, gc.stderr
    assert f"{tmp_path / 'one-off.db'}" in lines[0] and "the end of 1 run " in lines[0]
    assert str(project.root / "data" / "sync") in lines[0]


def test_gc_says_nothing_when_destinations_agree(project: Project, tmp_path: Path) -> None:
    project.spool(RUN, "only")
    assert project.ff_sync().returncode == 0
    assert project.ff_sync("--tracking-uri", f"sqlite:///{tmp_path / 'b.db'}").returncode == 0
    gc = project.ff_sync("gc", "--older-than", "0")
    assert gc.returncode == 0 and "has not synced" not in gc.stderr
    assert "archived 1 run folder, kept 0" in gc.stdout
