"""Spool files the sync cannot or must not read: reported by path, never fatal, the rest synced.

* unreadable run folders and segments (another user's umask 077, mode 000): ``ff-sync``,
  ``status`` and ``verify`` name each path with "permission denied" and go on;
* segments quarantined whole: a broken header (``header``), an unknown format (``version``),
  a header naming another run (a copied file: ``header``, and no ghost run from it);
* symbolic links under the spool root (a run folder or a segment): never followed, reported.

Permissions are tested for real: as root (the test machine) a mode-000 file is still
readable, so the commands run as ``nobody`` (uid/gid 65534) in a project every user can
read, whose store and state folders that user can write (``setpriv``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.tracking.events import frame

from .conftest import _OVERRIDES, FF_SYNC, PYTHON, Project

NOBODY = 65534

RUNS = """
with tracker.start_run(run_name="good") as g:
    g.log_param("lr", 0.1)
    g.log_metric("loss", 0.5, step=1)
with tracker.start_run(run_name="locked") as u:
    u.log_metric("loss", 0.25)
with tracker.start_run(run_name="split") as t:
    t.log_metric("loss", 1.0, step=0)
with tracker.start_run(run_name="linked") as k:
    k.log_metric("m", 1.0)
print(g.run_id, u.run_id, t.run_id, k.run_id)
"""


def _unprivileged() -> list[str]:
    """The prefix that runs a command as ``nobody`` (none when not root)."""
    if os.geteuid() != 0:
        return []  # not root: mode 000 already stops this user
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is needed to run the commands as an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@functools.cache
def _unprivileged_ok() -> bool:
    """Whether this interpreter runs as ``nobody`` (its files readable by that user)."""
    probe = subprocess.run(
        [*_unprivileged(), PYTHON, "-c", "import formula_foundry.sync.commands.cli"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A project every user can read; ``nobody`` can write its store and state folders.
    (pytest's tmp_path is private to root, so it lives in a folder of its own.)"""
    if not _unprivileged_ok():
        pytest.skip("this interpreter cannot run as an unprivileged user")
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    base = Path(tempfile.mkdtemp(prefix="ff-unreadable-"))
    base.chmod(0o755)
    proj = Project(base / "project")
    proj.configure()
    for folder in (proj.root / "data", proj.db.parent, proj.state_dir, base / "home"):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
    monkeypatch.chdir(proj.root)
    try:
        yield proj
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def _run(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """``ff-sync ARGS`` as an unprivileged user."""
    return subprocess.run(
        [*_unprivileged(), FF_SYNC, "--config", str(project.config), *args],
        cwd=project.root,
        env=project.env(HOME=str(project.root.parent / "home")),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _segment(folder: Path, run: str, t: int, records: list[dict[str, Any]], fmt: int = 1) -> Path:
    """A segment of ``run`` (its header's ``run``) written into ``folder``, records after it."""
    folder.mkdir(parents=True, exist_ok=True)
    seg = folder / f"seg-{t}-otherhost-7-a1b2c3.jsonl"
    header = {"v": 1, "s": 0, "t": t, "k": "segment", "format": fmt, "run": run, "host": "o"}
    header |= {"pid": 7, "segment": seg.name}
    body = [{"v": 1, "s": i + 1, "t": t + i, **rec} for i, rec in enumerate(records)]
    seg.write_bytes(b"".join(frame(rec) for rec in [header, *body]))
    return seg


def _start(name: str) -> dict[str, Any]:
    return {"k": "run_start", "experiment": "Default", "name": name, "parent": None}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _quarantine(project: Project) -> list[dict[str, Any]]:
    path = project.state_folder() / "quarantine.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lines_with(text: str, *needles: str) -> list[str]:
    """Lines of ``text`` holding every needle (case-insensitive)."""
    return [ln for ln in text.splitlines() if all(n.lower() in ln.lower() for n in needles)]


def _status_runs(out: str) -> dict[str, dict[str, Any]]:
    (dest,) = json.loads(out)["destinations"]
    return {r["run"]: r for r in dest["runs"]}


# -- point 10: unreadable folders and segments -----------------------------------------------


def test_an_unreadable_run_folder_is_named_and_everything_else_verified(shared: Project) -> None:
    good, locked, _, _ = shared.spool(RUNS).split()
    folder = shared.spool_root / locked
    folder.chmod(0o700)  # another user's umask 077

    status = _run(shared, "status", "--json")
    assert status.returncode == 0, status.stderr
    runs = _status_runs(status.stdout)
    assert runs[locked]["problems"] == [f"{folder}: permission denied"]
    assert runs[good]["problems"] == [] and runs[good]["events_pending"] == 4
    table = _run(shared, "status")
    assert table.returncode == 0, table.stderr
    assert f"run {locked}: {folder}: permission denied" in table.stdout

    result = _run(shared)
    assert result.returncode == 1, result.stderr  # never 70; 1 so cron notices
    assert "internal error" not in result.stderr
    assert locked not in shared.snapshot()["runs"] and good in shared.snapshot()["runs"]

    verify = _run(shared, "verify", "--json")
    assert verify.returncode == 1, verify.stderr
    diffs = json.loads(verify.stdout)["differences"]
    assert [(d["run"], d["kind"]) for d in diffs] == [(locked, "unreadable")]
    assert diffs[0]["message"] == f"run {locked}: {folder}: permission denied"


def test_an_unreadable_segment_with_the_run_start_waits_naming_it(shared: Project) -> None:
    good, locked, _, _ = shared.spool(RUNS).split()
    (seg,) = (shared.spool_root / locked).glob("seg-*.jsonl")
    seg.chmod(0o000)

    result = _run(shared)
    assert result.returncode == 1, result.stderr  # something is not synced: cron notices
    assert _lines_with(result.stderr, "unreadable:", locked)
    waiting = _lines_with(result.stderr, "waiting:", locked)
    assert waiting == [f"ff-sync: waiting: run {locked}: {seg}: permission denied; will retry"]
    assert "no run_start" not in result.stderr
    assert set(shared.snapshot()["runs"]) >= {good} and locked not in shared.snapshot()["runs"]

    status = _run(shared, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert _status_runs(status.stdout)[locked]["problems"] == [f"{seg}: permission denied"]
    verify = _run(shared, "verify", "--json")
    assert verify.returncode == 1, verify.stderr
    diffs = json.loads(verify.stdout)["differences"]
    assert [(d["run"], d["kind"], d["message"]) for d in diffs] == [
        (locked, "unreadable", f"run {locked}: {seg}: permission denied")
    ]

    seg.chmod(0o644)  # the owner fixes it: the next pass syncs the run, nothing was lost
    assert _run(shared).returncode == 0
    assert _run(shared, "verify").returncode == 0


# -- point 11: segments quarantined whole ------------------------------------------------------


def test_a_broken_or_future_header_is_quarantined_once_not_waiting(project: Project) -> None:
    (good,) = project.spool(
        'with tracker.start_run(run_name="g") as g:\n    print(g.run_id)\n'
    ).split()
    t = _now_ms()
    garbage, future = uuid.uuid4().hex, uuid.uuid4().hex
    broken = project.spool_root / garbage / f"seg-{t}-h-1-abcdef.jsonl"
    broken.parent.mkdir()
    broken.write_bytes(b"this is no header\n" + frame({"v": 1, "s": 1, "t": t, **_start("x")}))
    v2 = _segment(project.spool_root / future, future, t, [_start("y")], fmt=2)

    first = project.ff_sync()
    assert first.returncode == 1, first.stderr
    assert ", 2 quarantined, 2 waiting in " in first.stdout
    assert "no run_start" not in first.stderr
    assert _lines_with(first.stderr, "waiting:", garbage, f"{broken} is quarantined (header)")
    assert _lines_with(first.stderr, "waiting:", future, f"{v2} is quarantined (version)")
    found = sorted((q["run"], q["file"], q["kind"], q["line"]) for q in _quarantine(project))
    assert found == sorted([(garbage, str(broken), "header", 1), (future, str(v2), "version", 1)])
    assert set(project.snapshot()["runs"]) == {good}

    again = project.ff_sync()  # set aside for good: not read, reported or waiting again
    assert again.returncode == 0 and "nothing new" in again.stdout, again.stderr
    assert "waiting" not in again.stderr and len(_quarantine(project)) == 2

    status = project.ff_sync("status", "--json")
    runs = _status_runs(status.stdout)
    for run in (garbage, future):
        assert (runs[run]["events_pending"], runs[run]["events_quarantined"]) == (0, 1)
    verify = project.ff_sync("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_copied_segment_creates_no_ghost_run(project: Project) -> None:
    good, _, _, _ = project.spool(RUNS).split()
    (original,) = (project.spool_root / good).glob("seg-*.jsonl")
    ghost, own = uuid.uuid4().hex, uuid.uuid4().hex
    copy = project.spool_root / ghost / original.name
    copy.parent.mkdir()
    shutil.copy(original, copy)
    # A run of its own, with a copy of another run's segment sorting before its own one.
    early = project.spool_root / own / f"seg-1000000000000-{original.name.split('-', 2)[2]}"
    early.parent.mkdir()
    shutil.copy(original, early)
    _segment(project.spool_root / own, own, _now_ms(), [_start("mine")])

    result = project.ff_sync()
    assert result.returncode == 1, result.stderr
    runs = project.snapshot()["runs"]
    assert ghost not in runs
    assert runs[own]["name"] == "mine" and "lr" not in runs[own]["params"]
    found = sorted((q["run"], q["file"], q["kind"]) for q in _quarantine(project))
    assert found == sorted([(ghost, str(copy), "header"), (own, str(early), "header")])
    reasons = {q["file"]: q["reason"] for q in _quarantine(project)}
    assert reasons[str(copy)] == f"{copy}:1: the header names run '{good}', not {ghost}"

    again = project.ff_sync()
    assert again.returncode == 0 and len(_quarantine(project)) == 2, again.stderr
    runs_status = _status_runs(project.ff_sync("status", "--json").stdout)
    assert (runs_status[ghost]["events_pending"], runs_status[ghost]["events_quarantined"]) == (
        0,
        1,
    )
    assert runs_status[own]["events_pending"] == 0
    verify = project.ff_sync("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- point 18: symbolic links ------------------------------------------------------------------


def test_linked_run_folders_and_segments_are_reported_not_followed(project: Project) -> None:
    good, _, _, linked = project.spool(RUNS).split()
    elsewhere = project.root / "elsewhere"
    outside_run = uuid.uuid4().hex
    _segment(elsewhere / outside_run, outside_run, _now_ms(), [_start("outside")])
    folder_link = project.spool_root / outside_run
    folder_link.symlink_to(elsewhere / outside_run, target_is_directory=True)
    target = _segment(elsewhere, linked, _now_ms() + 1000, [{"k": "metrics", "d": {"m2": 2.0}}])
    seg_link = project.spool_root / linked / target.name
    seg_link.symlink_to(target)

    result = project.ff_sync()
    assert result.returncode == 1, result.stderr  # not synced, named: exit 1 until fixed
    runs = project.snapshot()["runs"]
    assert outside_run not in runs and "m2" not in runs[linked]["metrics"]
    for path in (folder_link, seg_link):
        assert _lines_with(result.stderr, str(path), "is a symbolic link; not synced"), path

    status = project.ff_sync("status", "--json")
    by_run = _status_runs(status.stdout)
    assert by_run[outside_run]["problems"] == [f"{folder_link}: is a symbolic link; not synced"]
    assert by_run[linked]["problems"] == [f"{seg_link}: is a symbolic link; not synced"]
    assert by_run[good]["problems"] == []
    table = project.ff_sync("status").stdout
    assert f"run {linked}: {seg_link}: is a symbolic link; not synced" in table

    verify = project.ff_sync("verify", "--json")
    assert verify.returncode == 1
    diffs = json.loads(verify.stdout)["differences"]
    assert sorted((d["run"], d["kind"]) for d in diffs) == sorted(
        [(outside_run, "symlink"), (linked, "symlink")]
    )


# -- all of it at once -------------------------------------------------------------------------


def test_one_pass_over_every_kind_of_unreadable_or_foreign_file(shared: Project) -> None:
    good, locked, split, linked = shared.spool(RUNS).split()
    root = shared.spool_root
    t = _now_ms() + 1000
    # A second segment of `split`, written by another user with umask 077.
    hidden = _segment(root / split, split, t, [{"k": "metrics", "step": 1, "d": {"loss": 2.0}}])
    hidden.chmod(0o600)
    (root / locked).chmod(0o000)
    garbage = uuid.uuid4().hex
    broken = _segment(root / garbage, garbage, t, [_start("garbage")])
    broken.write_bytes(b"\x00garbage\n" + broken.read_bytes().split(b"\n", 1)[1])
    copied = uuid.uuid4().hex
    (original,) = (root / good).glob("seg-*.jsonl")
    copy = root / copied / original.name
    copy.parent.mkdir()
    shutil.copy(original, copy)
    elsewhere = shared.root / "elsewhere"
    target = _segment(elsewhere, linked, t, [{"k": "metrics", "d": {"m2": 2.0}}])
    seg_link = root / linked / target.name
    seg_link.symlink_to(target)
    outside = uuid.uuid4().hex
    _segment(elsewhere / outside, outside, t, [_start("outside")])
    folder_link = root / outside
    folder_link.symlink_to(elsewhere / outside, target_is_directory=True)

    result = _run(shared)
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    runs = shared.snapshot()["runs"]
    assert set(runs) == {good, split, linked}  # no ghost, nothing unreadable or linked
    assert [p[0] for p in runs[split]["metrics"]["loss"]] == [0]
    assert set(runs[linked]["metrics"]) == {"m"}
    for path in (root / locked, hidden):
        assert _lines_with(result.stderr, str(path), "permission denied"), path
    for path in (folder_link, seg_link):
        assert _lines_with(result.stderr, str(path), "is a symbolic link; not synced"), path
    kinds = sorted((q["run"], q["file"], q["kind"]) for q in _quarantine(shared))
    assert kinds == sorted([(garbage, str(broken), "header"), (copied, str(copy), "header")])

    status = _run(shared, "status", "--json")
    assert status.returncode == 0, status.stderr
    by_run = _status_runs(status.stdout)
    assert by_run[locked]["problems"] == [f"{root / locked}: permission denied"]
    assert by_run[split]["problems"] == [f"{hidden}: permission denied"]
    assert by_run[linked]["problems"] == [f"{seg_link}: is a symbolic link; not synced"]
    assert by_run[outside]["problems"] == [f"{folder_link}: is a symbolic link; not synced"]
    for run in (garbage, copied):
        assert (by_run[run]["events_pending"], by_run[run]["events_quarantined"]) == (0, 1)
    assert by_run[good]["problems"] == [] and by_run[good]["events_pending"] == 0

    verify = _run(shared, "verify", "--json")
    assert verify.returncode == 1, verify.stderr
    diffs = json.loads(verify.stdout)["differences"]
    assert sorted((d["run"], d["kind"]) for d in diffs) == sorted(
        [(locked, "unreadable"), (split, "unreadable"), (linked, "symlink"), (outside, "symlink")]
    )

    again = _run(shared)  # still named, nothing quarantined twice
    assert again.returncode == 1 and "internal error" not in again.stderr
    assert _lines_with(again.stderr, str(hidden), "permission denied")
    assert len(_quarantine(shared)) == 2

    # The owners fix their files: everything readable is synced, nothing was lost.
    (root / locked).chmod(0o755)
    hidden.chmod(0o644)
    seg_link.unlink()
    folder_link.unlink()
    fixed = _run(shared)
    assert fixed.returncode == 0, fixed.stderr
    runs = shared.snapshot()["runs"]
    assert set(runs) == {good, locked, split, linked}
    assert [p[0] for p in runs[split]["metrics"]["loss"]] == [0, 1]
    verify = _run(shared, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
