"""A run's captured console reaches MLflow as ``console/<host>-<pid>.log``, against a real
SQLite store: whole for an ended run; in pieces for a live one, sealed pieces never sent again;
exactly one file per process with the bytes ``ff-sync tail`` prints once the run has ended,
whatever pass was killed (SIGKILL) on the way; ``verify`` downloads and checks the files."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main
from formula_foundry.sync.commands.tail import tail_run
from formula_foundry.sync.engine.console_upload import PIECE_BYTES
from formula_foundry.tracking.spool_reader import Event, SegmentReader

from .conftest import FF_SYNC, PYTHON, Project

CAPTURED = """
import os, sys
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # what the capture gets, not the test's pipe
with tracker.start_run(run_id="with-console", capture_output=True) as run:
    for step in range(50):
        print(f"step {step}", flush=True)
        run.log_metric("loss", 1.0 / (step + 1), step=step)
        os.write(2, b"\\xff not text\\n")  # base64 in the spool
    run.set_tag("phase", "done")
"""

# A live run: prints a batch, says so in a file, waits for the test's go; at the last one it
# ends. Batch sizes in bytes from argv; lines mix ASCII, two- and three-byte characters.
LIVE = """
import os, sys, time
from pathlib import Path
from formula_foundry.tracking import get_tracker
folder = Path(sys.argv[1])
with get_tracker().start_run(run_id="live-console", capture_output=True) as run:
    for n, size in enumerate(int(s) for s in sys.argv[2:]):
        line, written = 0, 0
        while written < size:
            text = f"batch {n} line {line:07d} é ✓ " + "x" * (line % 97) + "\\n"
            sys.stdout.write(text)
            written += len(text.encode())
            line += 1
        sys.stdout.write(f"end of batch {n}\\n")
        sys.stdout.flush()
        run.log_metric("batch", float(n), step=n)
        while not (folder / f"go-{n}").exists():
            time.sleep(0.01)
"""


def _tail(project: Project, run_id: str) -> bytes:
    out = bytearray()
    if not (project.spool_root / run_id).is_dir():
        return b""  # not started yet
    tail_run(project.spool_root, run_id, out=out.extend, note=lambda _: None)
    return bytes(out)


def _console(project: Project) -> dict[str, Path]:
    """The files under ``console/`` of the project's runs, by name."""
    root = project.root / "data" / "mlflow" / "artifacts"
    return {p.name: p for p in root.glob("*/*/artifacts/console/*") if p.is_file()}


def _start_live(project: Project, *sizes: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-c", LIVE, str(project.root), *map(str, sizes)],
        cwd=project.root,
        env=project.env(),
        stdout=subprocess.DEVNULL,  # stdout and stderr to one place: one stream, stdout+stderr
        stderr=subprocess.DEVNULL,
    )


def _wait_for(project: Project, run_id: str, marker: bytes, proc: subprocess.Popen[bytes]) -> None:
    """Until the spool holds ``marker`` (the capture spools a chunk 0.25 s after its start)."""
    deadline = time.monotonic() + 120
    while marker not in _tail(project, run_id):
        assert proc.poll() is None, f"the child exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"{marker!r} never reached the spool"
        time.sleep(0.05)


def test_an_ended_run_gets_one_file_per_process_that_verify_checks(project: Project) -> None:
    project.python(
        "from formula_foundry.tracking import get_tracker\ntracker = get_tracker()\n" + CAPTURED
    )
    (seg,) = (project.spool_root / "with-console").glob("seg-*.jsonl")
    reader = SegmentReader(seg)
    kinds = [e.kind for e in reader if isinstance(e, Event)]
    assert kinds.count("console") >= 1 and kinds.count("metrics") == 50
    report = project.sync()
    assert (report.exit_code, report.quarantined, report.problems) == (0, 0, [])
    assert not (project.state_folder() / "quarantine.jsonl").exists()
    run = project.snapshot()["runs"]["with-console"]
    assert len(run["metrics"]["loss"]) == 50 and run["tags"]["phase"] == "done"
    name = f"{socket.gethostname()}-{(reader.header or {})['pid']}.log"
    files = _console(project)
    assert list(files) == [name]
    shown = _tail(project, "with-console")
    assert files[name].read_bytes() == shown
    assert shown.count(b"\xff not text\n") == 50 and b"step 49\n" in shown
    result = CliRunner().invoke(main, ["--config", str(project.config), "verify"])
    assert (result.exit_code, result.stdout) == (
        0,
        f"ff-sync: verify: OK: 1 runs match -> {project.uri}\n",
    )
    # A second pass finds nothing new and sends nothing again.
    inode = files[name].stat().st_ino
    again = project.sync()
    assert (again.events, again.files, again.idle) == (0, 0, True)
    assert files[name].stat().st_ino == inode
    # A destination that lost the file (restored from a backup) gets it again with --replay.
    files[name].unlink()
    assert project.sync(replay=True).exit_code == 0
    assert files[name].read_bytes() == shown
    # verify reads the file: other bytes under its name are a difference.
    files[name].write_bytes(shown.replace(b"step 7\n", b"step 8\n"))
    result = CliRunner().invoke(main, ["--config", str(project.config), "verify"])
    assert result.exit_code != 0 and f"artifact 'console/{name}' holds" in result.stdout


def test_a_live_run_is_appended_in_pieces_then_made_one_file(project: Project) -> None:
    proc = _start_live(project, PIECE_BYTES + PIECE_BYTES // 2, PIECE_BYTES, 1000)
    try:
        main_name = f"{socket.gethostname()}-{proc.pid}.log"
        part = f"{socket.gethostname()}-{proc.pid}.part-0002.log"
        _wait_for(project, "live-console", b"end of batch 0\n", proc)
        assert project.sync().exit_code == 0
        first = _console(project)
        assert sorted(first) == [main_name, part]
        shown = _tail(project, "live-console")
        assert first[main_name].read_bytes() + first[part].read_bytes() == shown
        size = first[main_name].stat().st_size
        assert PIECE_BYTES - 64 * 1024 < size <= PIECE_BYTES and shown[size - 1 : size] == b"\n"
        sealed = first[main_name].stat().st_ino

        (project.root / "go-0").touch()
        _wait_for(project, "live-console", b"end of batch 1\n", proc)
        assert project.sync().exit_code == 0
        second = _console(project)
        part3 = part.replace("0002", "0003")
        assert sorted(second) == [main_name, part, part3]
        shown = _tail(project, "live-console")
        assert b"".join(second[n].read_bytes() for n in (main_name, part, part3)) == shown
        # The sealed first piece was not sent again (a new upload is a new file: MLflow's
        # local store renames a temporary file into place).
        assert second[main_name].stat().st_ino == sealed

        (project.root / "go-1").touch()
        _wait_for(project, "live-console", b"end of batch 2\n", proc)
        (project.root / "go-2").touch()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert project.sync().exit_code == 0
    final = _console(project)
    assert list(final) == [main_name]
    assert final[main_name].read_bytes() == _tail(project, "live-console")
    assert project.snapshot()["runs"]["live-console"]["status"] == "FINISHED"
    verified = project.ff_sync("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert project.sync().idle


def _tree(project: Project) -> dict[str, tuple[int, int, int]]:
    return {
        n: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for n, p in _console(project).items()
    }


def _passes_killed_mid_upload(project: Project, rng: random.Random) -> int:
    """ff-sync passes, each killed with SIGKILL soon after it changed the console files, until
    one finishes; how many were killed."""
    for kills in range(20):
        before = _tree(project)
        sync = subprocess.Popen(
            [FF_SYNC, "--config", str(project.config)],
            cwd=project.root,
            env=project.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while sync.poll() is None and time.monotonic() < deadline and _tree(project) == before:
            time.sleep(0.001)
        # Soon after, or a little later: a pass needs a few ms after its upload to record it.
        time.sleep(rng.uniform(0.0, 0.3))
        if sync.poll() is not None:
            assert sync.returncode == 0
            return kills
        os.kill(sync.pid, signal.SIGKILL)
        sync.wait(timeout=60)
    raise AssertionError("20 passes in a row were killed")


def test_sync_killed_mid_upload_leaves_exactly_the_console(project: Project) -> None:
    rng = random.Random(14)
    proc = _start_live(project, 2 * PIECE_BYTES + 12345, 3 * PIECE_BYTES)
    try:
        _wait_for(project, "live-console", b"end of batch 0\n", proc)
        kills = _passes_killed_mid_upload(project, rng)
        live = _console(project)
        assert len(live) == 3
        assert b"".join(
            live[n].read_bytes() for n in sorted(live, key=lambda n: (len(n), n))
        ) == _tail(project, "live-console")
        (project.root / "go-0").touch()
        _wait_for(project, "live-console", b"end of batch 1\n", proc)
        (project.root / "go-1").touch()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    kills += _passes_killed_mid_upload(project, rng)
    assert kills >= 1, "the passes ended before they could be killed mid-upload"
    again = project.ff_sync()
    assert again.returncode == 0, again.stderr
    final = _console(project)
    assert list(final) == [f"{socket.gethostname()}-{proc.pid}.log"]
    (path,) = final.values()
    assert path.read_bytes() == _tail(project, "live-console")
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    verified = project.ff_sync("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


RESUMED = """
import os, sys
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
with tracker.start_run(run_id="resumed-console", capture_output=True) as run:
    print(sys.argv[1], flush=True)
    run.log_metric("m", 1.0)
"""


def test_a_run_resumed_after_gc_keeps_the_console_of_its_first_process(
    project: Project,
) -> None:
    # The run ended and synced (its console files final), ff-sync gc archived its folder, and
    # a new process resumed it: the first process's console is still in MLflow and must stay
    # there (its segments are gone, so it cannot be rebuilt; read again it would be empty).
    prelude = "from formula_foundry.tracking import get_tracker\ntracker = get_tracker()\n"
    project.python(prelude + RESUMED, "first process")
    assert project.sync().exit_code == 0
    (first,) = _console(project).values()
    assert first.read_bytes() == b"first process\n"
    gc = subprocess.run(
        [FF_SYNC, "--config", str(project.config), "gc", "--older-than", "0"],
        env=project.env(),
        capture_output=True,
        text=True,
    )
    assert gc.returncode == 0 and "archived 1 run folder" in gc.stdout, gc.stdout + gc.stderr
    project.python(prelude + RESUMED, "second process")
    report = project.sync()
    assert report.exit_code == 0, report
    files = _console(project)
    assert sorted(p.read_bytes() for p in files.values()) == [
        b"first process\n",
        b"second process\n",
    ]
    assert files[first.name].read_bytes() == b"first process\n"
    assert project.sync().idle  # nothing owed: the passes after it have nothing to do
