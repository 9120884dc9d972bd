"""One segment per writing process: naming, header, durability modes, threads, fork, full disk."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from formula_foundry.errors import ConfigError, SpoolWriteError
from formula_foundry.tracking import Tracker, get_tracker
from formula_foundry.tracking.spool_writer import SegmentWriter, hostname

from ._helpers import child_env, only_segment, payloads, read_clean, run_python, segments

SEGMENT_NAME = re.compile(r"^seg-(\d{13})-([A-Za-z0-9_-]+)-(\d+)-([0-9a-f]{6})\.jsonl$")


def test_a_segment_is_created_on_the_first_event_with_a_header(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path / "spool", "abc123", "write")
    assert not (tmp_path / "spool").exists()  # nothing before the first event
    before = time.time_ns() // 1_000_000
    writer.append({"v": 1, "s": 0, "t": 5, "k": "tags", "d": {"a": "b"}})
    assert writer.path is not None and writer.path.parent == tmp_path / "spool" / "abc123"
    match = SEGMENT_NAME.match(writer.path.name)
    assert match, writer.path.name
    assert int(match[1]) >= before and int(match[3]) == os.getpid()
    events = read_clean(writer.path)
    header = events[0].data
    assert header["k"] == "segment" and header["format"] == 1 and header["s"] == 0
    assert header["run"] == "abc123" and header["pid"] == os.getpid()
    assert header["host"] == hostname() and header["segment"] == writer.path.name
    assert "forked_from" not in header
    assert payloads(events[1:]) == [{"k": "tags", "d": {"a": "b"}}]
    assert writer.last_seq == 1
    writer.close()


def test_hostname_is_what_socket_reports() -> None:
    import socket

    assert hostname() == socket.gethostname()


def test_after_close_the_next_event_opens_a_new_segment(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "r", "write")
    writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "1"}})
    first = writer.path
    writer.close()
    writer.close()  # closing twice is harmless
    writer.append({"v": 1, "s": 0, "t": 2, "k": "tags", "d": {"a": "2"}})
    writer.close()
    assert writer.path != first and sorted(segments(tmp_path, "r")) == sorted([first, writer.path])
    for path in (first, writer.path):
        assert path is not None
        assert [e.seq for e in read_clean(path)] == [0, 1]


def test_an_unknown_durability_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="durability must be one of write, fsync, buffered"):
        SegmentWriter(tmp_path, "r", "sometimes")


def test_a_spool_root_that_cannot_be_created_raises_spool_write_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    writer = SegmentWriter(tmp_path / "file" / "spool", "r1", "write")
    with pytest.raises(SpoolWriteError) as e:
        writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {}})
    assert str(e.value) == (
        f"run r1: cannot create spool folder {tmp_path / 'file' / 'spool' / 'r1'}: Not a directory"
    )


# --- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["write", "buffered"])
def test_threads_logging_to_one_run_interleave_whole_lines(
    ff_project: Path, clean_env: pytest.MonkeyPatch, durability: str
) -> None:
    clean_env.setenv("FF_DURABILITY", durability)
    tracker = get_tracker()
    threads_n, per_thread = 8, 1500
    start = threading.Barrier(threads_n)
    with tracker.start_run(run_name="threads") as run:

        def work(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                if i % 3 == 0:
                    run.log_metrics({f"t{t}/a": i * 0.5, f"t{t}/b": -i}, step=i)
                else:
                    run.log_metric(f"t{t}/m", i / 7, step=i)
            run.set_tag(f"done{t}", "yes" * 50)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    events = read_clean(only_segment(tracker.settings.spool_root, run.run_id))
    metrics = [e for e in events if e.kind == "metrics"]
    assert len(metrics) == threads_n * per_thread
    for t in range(threads_n):
        steps = [
            e.data["step"] for e in metrics if any(k.startswith(f"t{t}/") for k in e.data["d"])
        ]
        assert steps == list(range(per_thread)), f"thread {t} lost or reordered points"
    assert sum(e.kind == "tags" for e in events) == threads_n
    assert events[-1].kind == "run_end"


# --- fork -------------------------------------------------------------------------------------


def _wait_child(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_forked_child_writes_its_own_segment(tracker: Tracker, spool_root: Path) -> None:
    with tracker.start_run(run_name="parent") as run:
        run.log_metric("before", 1.0)
        parent_segment = run.spool_path
        assert parent_segment is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                for i in range(3):
                    run.log_metric("child", float(i), step=i)
                code = 0
            finally:
                os._exit(code)
        _wait_child(pid)
        run.log_metric("after", 2.0)
    found = segments(spool_root, run.run_id)
    assert len(found) == 2
    (child_segment,) = [p for p in found if p != parent_segment]
    parent_events = read_clean(parent_segment)
    child_events = read_clean(child_segment)
    assert [e.kind for e in parent_events] == [
        "segment",
        "run_start",
        "metrics",
        "metrics",
        "run_end",
    ]
    assert [list(e.data["d"]) for e in parent_events if e.kind == "metrics"] == [
        ["before"],
        ["after"],
    ]
    header = child_events[0].data
    assert header["forked_from"] == parent_segment.name
    assert header["pid"] == pid and header["run"] == run.run_id
    assert [(e.data["d"], e.data["step"]) for e in child_events[1:]] == [
        ({"child": 0.0}, 0),
        ({"child": 1.0}, 1),
        ({"child": 2.0}, 2),
    ]


_MP_RUN = None


def _mp_child(n: int) -> None:
    assert _MP_RUN is not None
    for i in range(n):
        _MP_RUN.log_metric("worker", float(i), step=i)


@pytest.mark.parametrize("durability", ["write", "buffered"])
def test_multiprocessing_fork_workers_get_their_own_segments(
    ff_project: Path, clean_env: pytest.MonkeyPatch, durability: str
) -> None:
    global _MP_RUN
    clean_env.setenv("FF_DURABILITY", durability)
    tracker = get_tracker()
    ctx = multiprocessing.get_context("fork")
    with tracker.start_run(run_name="mp") as run:
        run.log_metric("parent", 1.0)
        _MP_RUN = run
        try:
            procs = [ctx.Process(target=_mp_child, args=(5,)) for _ in range(3)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(30)
                assert p.exitcode == 0
        finally:
            _MP_RUN = None
        parent_segment = run.spool_path
    assert parent_segment is not None
    found = segments(tracker.settings.spool_root, run.run_id)
    assert len(found) == 4
    pids = set()
    for path in found:
        events = read_clean(path)
        if path == parent_segment:
            assert all("worker" not in e.data.get("d", {}) for e in events)
            continue
        # Buffered or not: a worker leaves through os._exit, and still loses nothing.
        header = events[0].data
        assert header["forked_from"] == parent_segment.name
        pids.add(header["pid"])
        assert [e.data["step"] for e in events[1:]] == [0, 1, 2, 3, 4]
        assert all(e.kind == "metrics" and list(e.data["d"]) == ["worker"] for e in events[1:])
    assert len(pids) == 3


def test_a_forked_child_that_exits_normally_does_not_end_the_parents_run(
    ff_project: Path,
) -> None:
    code = """
        import os, sys
        from formula_foundry.tracking import get_tracker
        tracker = get_tracker()
        run = tracker.start_run(run_name="parent")
        run.log_metric("a", 1.0)
        pid = os.fork()
        if pid == 0:
            assert tracker.active_run() is None  # as in MLflow: no active run after fork
            run.log_metric("child", 2.0)
            with tracker.start_run(run_name="own") as own:  # not an error: its own top level
                own.log_metric("x", 1.0)
            print(own.run_id, flush=True)
            sys.exit(0)  # normal exit: atexit handlers run in the child
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        run.log_metric("b", 3.0)
        print(run.run_id)
        # the parent ends its run at exit (atexit), FINISHED
    """
    out = run_python(code, cwd=ff_project).stdout.split()
    own_id, run_id = out
    spool = ff_project / "data" / "runs"
    by_kind: dict[str, list[str]] = {}
    for path in segments(spool, run_id):
        events = read_clean(path)
        by_kind["forked" if "forked_from" in events[0].data else "parent"] = [
            e.kind for e in events
        ]
    assert by_kind == {
        "parent": ["segment", "run_start", "metrics", "metrics", "run_end"],
        "forked": ["segment", "metrics"],
    }
    own = read_clean(only_segment(spool, own_id))
    assert own[1].data["parent"] is None and own[-1].data["status"] == "FINISHED"


# --- durability -------------------------------------------------------------------------------


def test_fsync_mode_syncs_every_event_and_the_new_segments_folder(
    ff_project: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("FF_DURABILITY", "fsync")
    synced: list[int] = []
    dir_synced: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def spy_fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    def spy_fsync(fd: int) -> None:
        dir_synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    clean_env.setattr(os, "fdatasync", spy_fdatasync)
    clean_env.setattr(os, "fsync", spy_fsync)
    tracker = get_tracker()
    assert tracker.settings.durability == "fsync"
    with tracker.start_run(run_name="durable") as run:
        for i in range(5):
            run.log_metric("m", float(i))
            # The event is on disk before the call returns: the last sync saw this size.
            assert run.spool_path is not None
            assert synced[-1] == run.spool_path.stat().st_size
        run.log_param("p", 1)
        path = run.spool_path
    assert path is not None
    events = read_clean(path)
    # header, run_start, 5 metrics, params, run_end; close() syncs once more.
    assert len(events) == 9
    assert len(synced) >= 9
    assert str(path.parent) in dir_synced


def test_buffered_mode_writes_at_exit(ff_project: Path) -> None:
    code = """
        import sys
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_name="buffered")
        for i in range(100):
            run.log_metric("m", float(i), step=i)
        path = run.spool_path
        # Only the header is in the file so far.
        print(run.run_id, path.stat().st_size, path.read_bytes().count(b"\\n"))
        # No end(): interpreter exit ends the run and flushes the buffer.
    """
    out = run_python(code, cwd=ff_project, env=child_env(FF_DURABILITY="buffered")).stdout
    run_id, size, lines = out.split()
    assert lines == "1"
    path = only_segment(ff_project / "data" / "runs", run_id)
    events = read_clean(path)
    assert path.stat().st_size > int(size)
    assert [e.data["step"] for e in events if e.kind == "metrics"] == list(range(100))
    assert events[-1].kind == "run_end" and events[-1].data["status"] == "FINISHED"


def test_buffered_mode_writes_in_blocks_and_at_run_end(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "r", "buffered")
    writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "b"}})
    assert writer.path is not None
    header_size = writer.path.stat().st_size
    big = "x" * 1000
    n = 0
    while writer.path.stat().st_size == header_size:
        n += 1
        writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": big}})
        assert n < 100, "64 KiB of events were never written"
    assert n >= 60  # about 64 KiB went out in one block
    writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "last"}})
    writer.flush()
    events = read_clean(writer.path)
    assert len(events) == n + 3 and events[-1].data["d"] == {"a": "last"}
    writer.close()


def test_buffered_mode_loses_the_unwritten_window_on_kill(ff_project: Path) -> None:
    code = """
        import os, signal
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_name="buffered")
        for i in range(50):
            run.log_metric("m", float(i), step=i)
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_python(code, cwd=ff_project, env=child_env(FF_DURABILITY="buffered"), check=False)
    assert result.returncode == -signal.SIGKILL
    path = only_segment(ff_project / "data" / "runs", result.stdout.strip())
    events = read_clean(path)
    assert [e.kind for e in events] == ["segment"]  # the documented loss: never a wrong event


def test_write_mode_keeps_everything_on_kill(ff_project: Path) -> None:
    code = """
        import os, signal
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_name="write")
        for i in range(50):
            run.log_metric("m", float(i), step=i)
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_python(code, cwd=ff_project, check=False)
    assert result.returncode == -signal.SIGKILL
    events = read_clean(only_segment(ff_project / "data" / "runs", result.stdout.strip()))
    assert [e.data["step"] for e in events if e.kind == "metrics"] == list(range(50))
    assert events[-1].kind == "metrics"  # killed: no end event


# --- full disk --------------------------------------------------------------------------------

FULL_DISK = """
    import json, os, resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    from formula_foundry.errors import SpoolWriteError
    from formula_foundry.tracking import get_tracker

    run = get_tracker().start_run(run_name="full")
    run.log_param("p", "x")
    path = run.spool_path
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = path.stat().st_size + 1000
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    n, message = 0, None
    while n < 1000:
        size = path.stat().st_size
        try:
            if n % 2:
                run.log_metric("m", n * 0.5, step=n)
            else:
                run.log_metrics({"a": float(n), "b": -1.0}, step=n)
        except SpoolWriteError as exc:
            message = str(exc)
            break
        n += 1
    failed = {"before": size, "after": path.stat().st_size, "limit": limit, "n": n}
    # Still full: a tag fails too, and leaves nothing.
    try:
        run.set_tag("t", "y" * 500)
        failed["tag"] = "written"
    except SpoolWriteError:
        failed["tag"] = path.stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
    run.log_metric("after", 1.0)
    run.end()
    print(json.dumps({"run": run.run_id, "path": str(path), "message": message, **failed}))
"""


def test_a_full_disk_raises_and_leaves_no_partial_line(ff_project: Path) -> None:
    out = json.loads(run_python(FULL_DISK, cwd=ff_project).stdout)
    path = Path(out["path"])
    assert out["message"] == (
        f"run {out['run']}: could not write to spool segment {path}: File too large "
        "(nothing of this call was kept)"
    )
    # The failing line did not fit: part of it was written, then cut off again.
    assert out["before"] == out["after"] < out["limit"]
    assert out["tag"] == out["after"]
    events = read_clean(path)  # no problem, clean tail, contiguous sequence numbers
    metrics = [e for e in events if e.kind == "metrics"]
    assert [e.data["step"] for e in metrics[: out["n"]]] == list(range(out["n"]))
    assert metrics[-1].data["d"] == {"after": 1.0}
    assert [e.kind for e in events[-2:]] == ["metrics", "run_end"]
    assert "tags" not in [e.kind for e in events]


def test_a_segment_whose_header_cannot_be_written_is_not_left_behind(ff_project: Path) -> None:
    code = """
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from formula_foundry.errors import SpoolWriteError
        from formula_foundry.tracking import get_tracker
        tracker = get_tracker()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40, hard))
        try:
            tracker.start_run(run_name="nospace")
        except SpoolWriteError as exc:
            print(exc)
        assert tracker.active_run() is None
    """
    out = run_python(code, cwd=ff_project).stdout
    assert "could not write to spool segment" in out and "File too large" in out
    spool = ff_project / "data" / "runs"
    assert [p.name for p in spool.iterdir()] != []  # the run folder was made ...
    assert list(spool.glob("*/seg-*")) == []  # ... but no headless segment left in it
