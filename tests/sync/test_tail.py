"""``ff-sync tail``: a run's captured console read back from the spool, merged across its
processes, followed while it runs; runs logged by real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main
from formula_foundry.tracking.spool_writer import hostname
from tests._proc import child_env

FF_SYNC = str(Path(sys.executable).with_name("ff-sync"))


def _child(project: Path, code: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=project,
        env=child_env(**env),
        capture_output=True,
        timeout=60,
        check=True,
    )


def _tail(*args: str) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(main, ["tail", *args], prog_name="ff-sync")
    return result.exit_code, result.stdout_bytes, result.stderr


def test_tail_prints_what_the_run_printed_stream_by_stream(ff_project: Path) -> None:
    printed = _child(
        ff_project,
        """
        import os, sys
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="printed", capture_output=True):
            for i in range(3):
                print(f"out {i}", flush=True)
                print(f"err {i}", file=sys.stderr, flush=True)
            os.write(1, "€ and bytes \\xff\\n".encode("utf-8", "surrogateescape"))
        """,
    )
    assert _tail("printed", "--stream", "stdout") == (0, printed.stdout, "")
    assert _tail("printed", "--stream", "stderr") == (0, printed.stderr, "")
    code, both, err = _tail("printed")
    assert (code, err) == (0, "")
    assert sorted(both.splitlines()) == sorted((printed.stdout + printed.stderr).splitlines())


def test_the_processes_of_a_run_are_merged_each_after_a_header(ff_project: Path) -> None:
    pids = []
    for program in (
        """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="ranks", capture_output=True):
            os.write(1, b"rank 0 says hello")  # no newline: the header starts a line anyway
        print(os.getpid(), file=__import__("sys").stderr)
        """,
        """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().attach_run("ranks", capture_output=True):
            os.write(1, b"rank 1 says hello\\n")
        print(os.getpid(), file=__import__("sys").stderr)
        """,
    ):
        pids.append(int(_child(ff_project, program).stderr))
    host = hostname()
    code, out, err = _tail("ranks")
    assert (code, err) == (0, "")
    assert (
        out
        == (
            f"==> {host} pid {pids[0]} <==\nrank 0 says hello\n"
            f"==> {host} pid {pids[1]} <==\nrank 1 says hello\n"
        ).encode()
    )


def test_what_the_capture_says_about_itself_goes_to_stderr(ff_project: Path) -> None:
    _child(
        ff_project,
        """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="capped", capture_output=True):
            os.write(1, b"0123456789" * 10)
        """,
        FF_CONSOLE_MAX_BYTES="25",
    )
    code, out, err = _tail("capped")
    assert (code, out) == (0, b"0123456789" * 2 + b"01234")
    source = err.split(":", 2)[1].strip()
    assert err == (
        f"ff-sync tail: {source}: the run's console reached its cap of 25 bytes "
        "(tracking.console_max_bytes); what it printed after is not in the spool\n"
        f"ff-sync tail: {source}: 75 bytes of stdout were not spooled\n"
    )


def test_one_stream_of_stdout_and_stderr_is_shown_whole_with_a_note(ff_project: Path) -> None:
    code = """
        import os, sys
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="merged", capture_output=True):
            os.write(1, b"out\\n")
            os.write(2, b"err\\n")
    """
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
        check=True,
    )
    code_, out, err = _tail("merged", "--stream", "stderr")
    assert (code_, out) == (0, b"out\nerr\n")
    assert err.endswith(
        ": stdout and stderr went to one place and were captured as one stream "
        "(stdout+stderr): shown whole\n"
    )


def test_a_run_without_console_or_without_spool(ff_project: Path) -> None:
    _child(
        ff_project,
        """
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="silent"):
            print("not captured")
        """,
    )
    assert _tail("silent") == (
        0,
        b"",
        "ff-sync tail: run silent has no console output in the spool (capture is off by "
        "default: start_run(capture_output=True), FF_CAPTURE_OUTPUT=1 or "
        "tracking.capture_output)\n",
    )
    spool = ff_project / "data" / "runs"
    assert _tail("nowhere") == (
        2,
        b"",
        f"ff-sync: error: run nowhere has no spool under {spool} (check --spool-root, "
        "FF_SPOOL_ROOT or spool.root)\n",
    )
    code, _, err = _tail("../etc")
    assert code == 2 and err.startswith("ff-sync: error: run id '../etc' is not valid")


def _start_slow_run(project: Path, run_id: str, lines: int, end: bool) -> subprocess.Popen[bytes]:
    code = f"""
        import os, time
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id={run_id!r}, capture_output=True)
        for i in range({lines}):
            os.write(1, b"tick %d\\n" % i)
            time.sleep(0.1)
        if {end}:
            run.end()
        else:
            time.sleep(600)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=project,
        env=child_env(),
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not (project / "data" / "runs" / run_id).is_dir():
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    return proc


def test_follow_prints_while_the_run_runs_and_stops_at_its_end(ff_project: Path) -> None:
    job = _start_slow_run(ff_project, "followed", 20, end=True)
    tail = subprocess.run(
        [FF_SYNC, "tail", "--follow", "followed"],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        timeout=60,
    )
    job_out, _ = job.communicate(timeout=60)
    assert (tail.returncode, tail.stderr) == (0, b"")
    assert tail.stdout == job_out == b"".join(b"tick %d\n" % i for i in range(20))


def test_follow_stops_quietly_on_ctrl_c(ff_project: Path) -> None:
    job = _start_slow_run(ff_project, "endless", 3, end=False)
    tail = subprocess.Popen(
        [FF_SYNC, "tail", "-f", "endless"],
        cwd=ff_project,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        lines = [tail.stdout.readline() for _ in range(3)]  # following, while the run runs
        tail.send_signal(signal.SIGINT)
        out, err = tail.communicate(timeout=30)
    finally:
        job.kill()
        job.wait()
    assert lines == [b"tick %d\n" % i for i in range(3)]
    assert (tail.returncode, out, err) == (0, b"", b"")


def test_a_reader_that_stops_reading_ends_tail_quietly(ff_project: Path) -> None:
    _child(
        ff_project,
        """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="long", capture_output=True):
            for i in range(100000):
                os.write(1, b"line %d\\n" % i)
        """,
    )
    read_fd, write_fd = os.pipe()
    tail = subprocess.Popen(
        [FF_SYNC, "tail", "long"], cwd=ff_project, env=child_env(), stdout=write_fd, stderr=-1
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as head:
        assert head.readline() == b"line 0\n"
    _, err = tail.communicate(timeout=60)
    assert (tail.returncode, err) == (0, b"")
