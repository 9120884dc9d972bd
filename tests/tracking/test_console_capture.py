"""Console capture: real child processes whose fds 1 and 2 a run captures, and what their
terminal, their pipes and the spool get; the console events' format, cap and settings."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from formula_foundry.config import load_settings
from formula_foundry.errors import ConfigError
from formula_foundry.tracking.console_events import (
    CHUNK_BYTES,
    MERGED,
    Chunker,
    console_item,
    split_record,
    unfinished_tail,
    utf8_cut,
)
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import SegmentWriter

from ._helpers import child_env, read, segments, start_child

# Writes to stdout and stderr every way a job can: Python, the fds, the C library, a Python
# child and a shell child. "BEFORE" and "AFTER" are written outside the run. The C library
# buffers printf to a pipe (not with `python -u`): the first is flushed inside the run, the
# second goes out when the C library writes it, at exit, past the capture, as without it.
PROGRAM = r"""
import ctypes, os, subprocess, sys
from formula_foundry.tracking import get_tracker

libc = ctypes.CDLL(None)
print("BEFORE", flush=True)
print("BEFORE", file=sys.stderr, flush=True)
with get_tracker().start_run(run_id=sys.argv[1], **eval(sys.argv[2])) as run:
    print("print to stdout")
    print("print to stderr", file=sys.stderr)
    os.write(1, b"os.write to fd 1\n")
    os.write(2, b"os.write to fd 2\n")
    libc.write(1, b"libc write to fd 1\n", 19)
    libc.printf(b"printf from C: %d\n", 42)
    libc.fflush(None)
    libc.printf(b"printf left in the C library's buffer\n")
    print("isatty", os.isatty(1), os.isatty(2))
    sys.stdout.flush()
    subprocess.run(
        [sys.executable, "-c", "import os; os.write(1, b'child stdout\\n'); "
         "os.write(2, b'child stderr\\n')"],
        check=True,
    )
    subprocess.run(["sh", "-c", "echo shell echo; echo shell stderr >&2"], check=True)
    print("unicode: \u00e9\u20ac\U0001f600", "bytes:", end=" ")
    sys.stdout.flush()
    os.write(1, b"\xff\xfe not utf-8 \x80\n")
    sys.stdout.write("no newline at the end")
print("AFTER", flush=True)
print("AFTER", file=sys.stderr, flush=True)
"""


def console_events(spool: Path, run_id: str) -> list[Event]:
    """The run's console events, segment after segment; every segment reads clean."""
    out: list[Event] = []
    for seg in segments(spool, run_id):
        events, problems, _ = read(seg)
        assert problems == [], [p.describe() for p in problems]
        out.extend(e for e in events if e.kind == "console")
    return out


def console_bytes(events: list[Event], stream: str) -> bytes:
    data = b""
    for e in events:
        item = console_item(e.data)
        assert item is not None, e.data
        if item.stream == stream:
            data += item.data
    return data


def kinds(spool: Path, run_id: str) -> list[str]:
    (seg,) = segments(spool, run_id)
    return [e.kind for e in read(seg)[0]]


def run_program(
    project: Path, run_id: str, kwargs: str, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, run_id, kwargs],
        cwd=project,
        env=child_env(**env),
        capture_output=True,
        timeout=60,
        check=True,
    )


def between(data: bytes, start: bytes, end: bytes) -> bytes:
    return data[data.index(start) + len(start) : data.rindex(end)]


def test_python_fd_c_library_and_child_output_is_captured_as_it_was_written(
    ff_project: Path,
) -> None:
    spool = ff_project / "data" / "runs"
    result = run_program(ff_project, "apart", "{'capture_output': True}")
    events = console_events(spool, "apart")
    # What the run captured is exactly what the pipes got while it ran, stream by stream.
    out = between(result.stdout, b"BEFORE\n", b"AFTER\n")
    err = between(result.stderr, b"BEFORE\n", b"AFTER\n")
    assert console_bytes(events, "stdout") == out
    assert console_bytes(events, "stderr") == err
    for text in (
        b"print to stdout\n",
        b"os.write to fd 1\n",
        b"libc write to fd 1\n",
        b"printf from C: 42\n",  # flushed by the program inside the run
        b"isatty False False\n",
        b"child stdout\n",
        b"shell echo\n",
        "unicode: \u00e9\u20ac\U0001f600 bytes: ".encode(),
        b"\xff\xfe not utf-8 \x80\n",
    ):
        assert text in out
    assert out.endswith(b"no newline at the end")
    for text in (b"print to stderr\n", b"os.write to fd 2\n", b"child stderr\n", b"shell stderr"):
        assert text in err
    # Bytes that are not UTF-8 travel as base64, the rest as text; all before the run's end.
    assert any("b64" in e.data for e in events) and any("text" in e.data for e in events)
    assert kinds(spool, "apart")[-1] == "run_end"


@pytest.mark.parametrize("stderr", ["apart", "same"])
def test_the_pipes_get_the_same_bytes_with_capture_on_and_off(
    ff_project: Path, stderr: str
) -> None:
    def run(run_id: str, on: str) -> tuple[bytes, bytes]:
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM, run_id, "{}"],
            cwd=ff_project,
            env=child_env(FF_CAPTURE_OUTPUT=on),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr == "apart" else subprocess.STDOUT,
            timeout=60,
            check=True,
        )
        return result.stdout, result.stderr or b""

    off = run("off", "0")
    on = run("on", "1")
    assert on == off
    spool = ff_project / "data" / "runs"
    assert console_events(spool, "off") == []
    events = console_events(spool, "on")
    if stderr == "same":
        # One place: one stream, in the order the program wrote it.
        assert {e.data["stream"] for e in events} == {MERGED}
        merged = between(on[0], b"BEFORE\nBEFORE\n", b"AFTER\nAFTER\n")
        assert console_bytes(events, MERGED) == merged
    else:
        assert {e.data["stream"] for e in events} == {"stdout", "stderr"}


def _pty_run(project: Path, run_id: str, on: str) -> bytes:
    """Run PROGRAM with stdout and stderr on a terminal of 33 rows and 101 columns; what the
    terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    code = PROGRAM.replace(
        'print("isatty", os.isatty(1), os.isatty(2))',
        'print("isatty", os.isatty(1), os.isatty(2), tuple(os.get_terminal_size(1)))',
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, run_id, "{}"],
        cwd=project,
        env=child_env(FF_CAPTURE_OUTPUT=on),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    got = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not data:
            break
        got += data
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return bytes(got)


def test_a_terminal_gets_the_same_bytes_and_is_still_a_terminal(ff_project: Path) -> None:
    off = _pty_run(ff_project, "tty-off", "0")
    on = _pty_run(ff_project, "tty-on", "1")
    assert on == off
    assert b"isatty True True (101, 33)\r\n" in on
    events = console_events(ff_project / "data" / "runs", "tty-on")
    # The terminal turned "\n" into "\r\n"; the spool has what the program wrote.
    assert console_bytes(events, MERGED).replace(b"\n", b"\r\n") == between(
        on, b"BEFORE\r\nBEFORE\r\n", b"AFTER\r\nAFTER\r\n"
    )


def test_capture_is_off_by_default(ff_project: Path) -> None:
    code = """
        import os, sys
        from formula_foundry.tracking import get_tracker
        before = os.fstat(1).st_ino
        with get_tracker().start_run(run_id="quiet") as run:
            print("same fd 1:", os.fstat(1).st_ino == before, flush=True)
            os.write(2, b"to fd 2\\n")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == b"same fd 1: True\n"
    assert kinds(ff_project / "data" / "runs", "quiet") == ["segment", "run_start", "run_end"]


SETTINGS_PROGRAM = """
import os, sys
from formula_foundry.tracking import get_tracker
tracker = get_tracker()
with tracker.start_run(run_id="outer", **eval(sys.argv[1])) as outer:
    print("in outer", flush=True)
    with tracker.start_run(run_id="inner", nested=True) as inner:
        print("in inner", flush=True)
"""


@pytest.mark.parametrize(
    ("kwargs", "env", "config", "captured"),
    [
        ("{}", {}, "", False),
        ("{}", {"FF_CAPTURE_OUTPUT": "1"}, "", True),
        ("{}", {}, "capture_output: true", True),
        ("{}", {"FF_CAPTURE_OUTPUT": "0"}, "capture_output: true", False),
        ("{'capture_output': False}", {"FF_CAPTURE_OUTPUT": "1"}, "", False),
        ("{'capture_output': True}", {"FF_CAPTURE_OUTPUT": "0"}, "", True),
    ],
)
def test_the_argument_wins_over_the_environment_which_wins_over_the_file(
    ff_project: Path, kwargs: str, env: dict[str, str], config: str, captured: bool
) -> None:
    if config:  # the documented file, with the key changed
        path = ff_project / "config" / "mlflow.yaml"
        text = path.read_text()
        assert "\n  capture_output: false\n" in text
        path.write_text(text.replace("\n  capture_output: false\n", f"\n  {config}\n"))
    subprocess.run(
        [sys.executable, "-c", SETTINGS_PROGRAM, kwargs],
        cwd=ff_project,
        env=child_env(**env),
        capture_output=True,
        timeout=60,
        check=True,
    )
    spool = ff_project / "data" / "runs"
    outer = console_bytes(console_events(spool, "outer"), "stdout")
    assert outer == (b"in outer\nin inner\n" if captured else b"")
    # A nested run captures only when asked: its parent's capture covers the process.
    assert console_events(spool, "inner") == []


def test_a_second_capture_in_one_process_is_refused_with_one_warning(ff_project: Path) -> None:
    code = """
        from formula_foundry.tracking import get_tracker
        tracker = get_tracker()
        with tracker.start_run(run_id="first", capture_output=True):
            with tracker.start_run(run_id="second", nested=True, capture_output=True):
                print("inside both", flush=True)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    spool = ff_project / "data" / "runs"
    warning = (
        b"formula-foundry console capture: run second does not capture the console: another "
        b"run of this process captures it already (one capture per process)\n"
    )
    assert result.stderr == warning
    assert console_bytes(console_events(spool, "first"), "stdout") == b"inside both\n"
    assert console_bytes(console_events(spool, "first"), "stderr") == warning
    assert console_events(spool, "second") == []


def test_kill_9_loses_no_chunk_that_was_spooled(ff_project: Path) -> None:
    code = """
        import os, time
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="killed", capture_output=True)
        i = 0
        while True:
            os.write(1, b"line %06d\\n" % i)
            i += 1
            time.sleep(0.001)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    got = bytearray()

    def take_all() -> None:
        assert proc.stdout is not None
        while data := os.read(proc.stdout.fileno(), 65536):
            got.extend(data)

    drain = threading.Thread(target=take_all)
    drain.start()
    spool = ff_project / "data" / "runs"
    deadline = time.monotonic() + 30
    before: list[Event] = []
    while len(before) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
        if (spool / "killed").is_dir():
            before = console_events(spool, "killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    drain.join(timeout=30)
    assert len(before) >= 4, "the capture spooled too little in 30 s"
    after = console_events(spool, "killed")
    # Every chunk whose write had returned is there, whole, in its place.
    assert after[: len(before)] == before
    spooled = console_bytes(after, "stdout")
    lines = spooled.split(b"\n")
    assert spooled.endswith(b"\n") and lines[:-1] == [
        b"line %06d" % i for i in range(len(lines) - 1)
    ]
    assert bytes(got).startswith(spooled)  # the pipe got all of it, and more
    assert "run_end" not in kinds(spool, "killed")


def test_a_10_mb_burst_is_cut_at_the_cap_and_what_was_dropped_is_said(ff_project: Path) -> None:
    code = """
        import os
        from formula_foundry.tracking import get_tracker
        block = b"x" * 1023 + b"\\n"
        with get_tracker().start_run(run_id="burst", capture_output=True):
            for _ in range(10 * 1024):
                os.write(1, block)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(FF_CONSOLE_MAX_BYTES="1000000"),
        capture_output=True,
        timeout=120,
        check=True,
    )
    total = 10 * 1024 * 1024
    assert result.stdout == (b"x" * 1023 + b"\n") * (10 * 1024)  # the pipe got all of it
    spool = ff_project / "data" / "runs"
    events = console_events(spool, "burst")
    assert console_bytes(events, "stdout") == result.stdout[:1_000_000]
    notes = [e.data for e in events if "text" not in e.data]
    assert [{k: n[k] for k in ("stream", "limit", "dropped") if k in n} for n in notes] == [
        {"stream": "stdout", "limit": 1_000_000},
        {"stream": "stdout", "dropped": total - 1_000_000},
    ]
    assert all(len(e.data.get("text", "")) <= CHUNK_BYTES for e in events)
    (seg,) = segments(spool, "burst")
    assert seg.stat().st_size < 1_100_000
    assert kinds(spool, "burst")[-2:] == ["console", "run_end"]


@pytest.mark.parametrize("how", ["sigterm", "exit", "exception"])
def test_the_last_chunk_is_spooled_before_the_run_end_however_the_run_ends(
    ff_project: Path, how: str
) -> None:
    end = {
        "sigterm": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
        "exit": "sys.exit(0)",
        "exception": "raise RuntimeError('the job broke')",
    }[how]
    code = f"""
        import os, signal, sys, time
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="ending", capture_output=True)
        sys.stdout.write("the last words")
        {end}
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        timeout=60,
    )
    spool = ff_project / "data" / "runs"
    events = console_events(spool, "ending")
    assert console_bytes(events, "stdout") == result.stdout == b"the last words"
    (seg,) = segments(spool, "ending")
    all_events, _, _ = read(seg)
    assert [e.kind for e in all_events][-1] == "run_end"
    status = {"sigterm": "KILLED", "exit": "FINISHED", "exception": "FAILED"}[how]
    assert all_events[-1].data["status"] == status
    if how == "exception":
        # The traceback is printed while captured: in the run's console, once on stderr.
        err = console_bytes(events, "stderr")
        assert err == result.stderr and err.count(b"RuntimeError: the job broke\n") == 1
        assert err.startswith(b"Traceback (most recent call last):\n")


def test_a_forked_child_writes_into_its_parents_capture(ff_project: Path) -> None:
    code = """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="forking", capture_output=True):
            pid = os.fork()
            if pid == 0:
                os.write(1, b"from the forked child\\n")
                os._exit(0)
            os.waitpid(pid, 0)
            os.write(1, b"from the parent\\n")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    events = console_events(ff_project / "data" / "runs", "forking")
    assert console_bytes(events, "stdout") == result.stdout
    assert result.stdout == b"from the forked child\nfrom the parent\n"


def test_a_reader_that_goes_away_is_passed_on_to_the_program(ff_project: Path) -> None:
    # `python job.py | head -1`: without the capture, the job's writes fail with EPIPE once
    # head exits; with it, they must fail too, not pile up unseen.
    code = """
        import os, sys
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="piped", capture_output=True):
            for i in range(100000):
                try:
                    os.write(1, b"line %d\\n" % i)
                except BrokenPipeError:
                    os.write(2, b"EPIPE\\n")
                    break
    """
    proc = start_child(code, ff_project)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    assert proc.stderr.read() == b"EPIPE\n"
    assert proc.wait(timeout=60) == 0


# -- the events ---------------------------------------------------------------------------------


def test_chunks_end_on_whole_characters_and_read_back_as_the_bytes() -> None:
    text = ("a€😀" * 300_000).encode()  # 1, 3 and 4 bytes per character, over 2 chunks
    chunker = Chunker(1 << 30)
    for i in range(0, len(text), 10_000):  # pieces that cut characters anywhere
        chunker.add("stdout", text[i : i + 10_000], i)
    records = [r for r, _, _ in chunker.take(7, final=True)]
    assert all("text" in r for r in records)
    assert len(records) == 3 and all(len(r["text"].encode()) <= CHUNK_BYTES for r in records)
    back = b"".join(item.data for r in records if (item := console_item(r)) is not None)
    assert back == text


def test_an_unfinished_character_waits_for_its_end_and_bad_bytes_go_as_base64() -> None:
    chunker = Chunker(1 << 30)
    chunker.add("stderr", "x€".encode()[:-1], 1)  # the euro sign's last byte still to come
    ((first, _, n),) = chunker.take(2)
    assert (first["text"], n) == ("x", 1)
    chunker.add("stderr", "€".encode()[-1:] + b"\xff", 3)
    ((second, _, _),) = chunker.take(4, final=True)
    assert "text" not in second
    item = console_item(second)
    assert item is not None and item.data == "€".encode() + b"\xff"
    assert unfinished_tail("a€".encode()[:-2]) == 1
    assert unfinished_tail(b"abc") == 0
    assert utf8_cut("€€".encode(), 4) == 3


def test_the_cap_cuts_on_a_character_and_counts_the_rest() -> None:
    chunker = Chunker(10)
    chunker.add("stdout", "abcdefghi€z".encode(), 1)  # the euro sign straddles byte 10
    chunker.add("stderr", b"later", 2)
    records = [r for r, _, _ in chunker.take(3, final=True)]
    assert [{k: v for k, v in r.items() if k not in ("v", "s", "t", "k")} for r in records] == [
        {"stream": "stdout", "text": "abcdefghi"},
        {"stream": "stdout", "limit": 10},
        {"stream": "stdout", "dropped": 4},
        {"stream": "stderr", "dropped": 5},
    ]
    assert console_item({"stream": "stdout", "b64": "!!"}) is None
    assert console_item({"stream": "nope", "text": "x"}) is None


# -- the settings -------------------------------------------------------------------------------


def test_capture_settings_and_their_errors(ff_project: Path, clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.capture_output, settings.console_max_bytes) == (False, 100 * 1024 * 1024)
    clean_env.setenv("FF_CAPTURE_OUTPUT", "yes")
    clean_env.setenv("FF_CONSOLE_MAX_BYTES", "2048")
    assert (load_settings().capture_output, load_settings().console_max_bytes) == (True, 2048)
    clean_env.setenv("FF_CAPTURE_OUTPUT", "maybe")
    with pytest.raises(ConfigError, match=r"^FF_CAPTURE_OUTPUT must be 1 or 0, got 'maybe'$"):
        load_settings()
    clean_env.setenv("FF_CAPTURE_OUTPUT", "1")
    clean_env.setenv("FF_CONSOLE_MAX_BYTES", "-1")
    with pytest.raises(ConfigError, match=r"^FF_CONSOLE_MAX_BYTES must be >= 0 bytes, got -1$"):
        load_settings()
    clean_env.setenv("FF_CONSOLE_MAX_BYTES", "1MB")
    with pytest.raises(ConfigError, match="FF_CONSOLE_MAX_BYTES must be a whole number of bytes"):
        load_settings()
    clean_env.delenv("FF_CONSOLE_MAX_BYTES")
    path = ff_project / "config" / "mlflow.yaml"
    text = path.read_text()
    assert "\n  console_max_bytes: 104857600\n" in text  # the documented default
    path.write_text(text.replace("console_max_bytes: 104857600", "console_max_bytes: x"))
    with pytest.raises(ConfigError, match=r"tracking.console_max_bytes must be int, got 'x'$"):
        load_settings()


def test_a_flag_that_is_not_a_bool_is_refused(ff_project: Path) -> None:
    from formula_foundry.errors import ValidationError
    from formula_foundry.tracking import get_tracker

    with pytest.raises(ValidationError, match=r"^capture_output must be True, False or None"):
        get_tracker().start_run(capture_output="yes")  # type: ignore[arg-type]


def test_the_reader_reads_console_events_of_a_real_spool(ff_project: Path) -> None:
    run_program(ff_project, "reread", "{'capture_output': True}")
    (seg,) = segments(ff_project / "data" / "runs", "reread")
    assert all(isinstance(i, Event) for i in SegmentReader(seg))


def test_split_console_events_are_the_bytes_frame_writes(tmp_path: Path) -> None:
    # The capture writes its events split (the chunk's JSON where it lies); a reader must not
    # be able to tell them from append_many's, byte for byte, nor lose one to a torn line.
    chunker = Chunker(40)
    chunker.add("stdout", 'quote " back \\ tab \t esc \x1b € nl\n'.encode(), 5)
    chunker.add("stderr", b"\xff\xfe not utf-8", 6)
    chunker.add("stderr", b"past the cap", 7)
    records = [r for r, _, _ in chunker.take(8, final=True)]
    assert {k for r in records for k in r} >= {"text", "b64", "limit", "dropped"}
    written = []
    for how in ("many", "split"):
        writer = SegmentWriter(tmp_path / how, "r")
        writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "b"}})
        copies = [dict(r) for r in records]
        if how == "many":
            writer.append_many(copies)
        else:
            writer.append_split("console", [split_record(r) for r in copies])
        writer.close()
        assert writer.path is not None
        written.append(writer.path.read_bytes().split(b"\n", 1)[1])  # past the header
    assert written[0] == written[1]
    (seg,) = (tmp_path / "split" / "r").glob("seg-*.jsonl")
    events, problems, _ = read(seg)
    assert problems == [] and [e.seq for e in events] == list(range(len(records) + 2))
