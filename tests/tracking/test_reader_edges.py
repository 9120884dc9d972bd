"""The reader at the edges: lines without an end, out-of-range envelopes, hostile headers.

Every input here is a real file on disk read by the real ``SegmentReader``. Where a test needs
lines longer than the reader's limit without writing gigabytes, it scales the limit and the
read size down (the two module constants); the big files are read in a child process at the
real limits.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formula_foundry.errors import SpoolCorrupt, UnsupportedSpoolVersion
from formula_foundry.tracking import spool_reader
from formula_foundry.tracking.events import INT64_MAX, KINDS, frame, frame_metric
from formula_foundry.tracking.spool_reader import (
    MAX_LINE_BYTES,
    Event,
    Problem,
    SegmentReader,
    read_header,
)

from ._helpers import read, run_python

T0 = 1_767_225_600_000
HEADER = {"v": 1, "s": 0, "t": T0, "k": "segment", "format": 1, "run": "run0", "pid": 7}
FUZZ = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=300
)


def metric(seq: int) -> bytes:
    return frame_metric(seq, T0 + seq, seq, b'"loss"', b"%r" % (seq / 8))


def frame_any(record: dict[str, Any]) -> bytes:
    """Like events.frame, for any JSON (integers beyond 64 bits too): a valid checksum."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    head = text.encode("utf-8", "surrogatepass")[:-1]  # a lone surrogate: invalid UTF-8
    return b'%b,"c":"%08x"}\n' % (head, zlib.crc32(head))


def write(path: Path, *parts: bytes) -> Path:
    path.write_bytes(b"".join(parts))
    return path


def kinds(items: list[Event | Problem]) -> list[str]:
    return [i.kind if isinstance(i, Problem) else f"Event {i.seq}" for i in items]


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> int:
    """Read 64 bytes at a time and accept lines of at most 1000 bytes (the same code path)."""
    monkeypatch.setattr(spool_reader, "_CHUNK", 64)
    monkeypatch.setattr(spool_reader, "MAX_LINE_BYTES", 1000)
    return 1000


# -- lines without an end: linear, bounded, and reported once --------------------------------

_BIG = """
import os, resource, sys, time
from pathlib import Path
from formula_foundry.tracking.events import frame, frame_metric
from formula_foundry.tracking.spool_reader import Event, SegmentReader

path, size, tail = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def metric(seq):
    return frame_metric(seq, 1767225600000 + seq, seq, b'"loss"', b"1.0")
header = frame({"v": 1, "s": 0, "t": 1767225600000, "k": "segment", "format": 1, "run": "r"})
with open(path, "wb") as fh:
    fh.write(header + metric(1))
    fh.seek(size, os.SEEK_CUR)  # a hole: reads as NULs, costs no disk
    fh.write(metric(2))  # on the same line as the NULs
    block = b"x" * (1 << 20)
    for _ in range(size >> 20):
        fh.write(block)
    fh.write(b"\\n" + metric(3))
    for _ in range(tail >> 20):
        fh.write(block)
def peak_kb():
    # VmHWM is this program's own peak: ru_maxrss also counts the parent's memory at the
    # fork before exec (Linux keeps it across execve), e.g. a pytest process that loaded mlflow.
    try:
        with open("/proc/self/status") as status:
            return next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reader = SegmentReader(path)
items = [(type(i).__name__, i.kind, i.line, i.offset) for i in reader]
state = (reader.end_offset, reader.end_line, reader.last_seq, reader.tail)
print(repr((items, state, peak_kb())))
"""


def test_huge_nul_runs_and_garbage_lines_are_read_in_bounded_memory(tmp_path: Path) -> None:
    size, unfinished = 200 << 20, 100 << 20  # three times and 1.5 times the limit
    path = tmp_path / "seg.jsonl"
    out = run_python(_BIG, str(path), str(size), str(unfinished), cwd=tmp_path, timeout=300).stdout
    items, state, maxrss_kb = eval(out)
    h = len(frame({"v": 1, "s": 0, "t": T0, "k": "segment", "format": 1, "run": "r"}))
    m = len(frame_metric(1, T0 + 1, 1, b'"loss"', b"1.0"))  # as the child writes them
    nul_line = h + m
    garbage_line = nul_line + size + m
    tail = garbage_line + size + 1 + m
    assert items == [
        ("Event", "segment", 1, 0),
        ("Event", "metrics", 2, h),
        ("Problem", "nul_hole", 3, nul_line),
        ("Event", "metrics", 3, nul_line + size),  # the record after the NULs is kept
        ("Problem", "too_long", 4, garbage_line),
        ("Event", "metrics", 5, garbage_line + size + 1),
    ]
    # The unterminated tail stays for the next pass: a writer could still be in it.
    assert state == (tail, 5, 3, "unfinished")
    assert path.stat().st_size == tail + unfinished
    # Peak memory of the whole child: Python, orjson, and at most one line of 64 MiB.
    assert maxrss_kb < 150 * 1024, f"peak RSS {maxrss_kb // 1024} MB"


def test_a_line_longer_than_the_limit_is_one_problem(tmp_path: Path, small_limits: int) -> None:
    junk = b"x" * 5000  # 80 reads of 64 bytes, no newline
    path = write(tmp_path / "s.jsonl", frame(HEADER), metric(1), junk + b"\n", metric(2))
    starts = [0, len(frame(HEADER))]
    starts += [starts[1] + len(metric(1)), starts[1] + len(metric(1)) + len(junk) + 1]
    events, problems, reader = read(path)
    assert [(e.seq, e.line, e.offset) for e in events] == [
        (0, 1, 0),
        (1, 2, starts[1]),
        (2, 4, starts[3]),
    ]
    (problem,) = problems
    assert (problem.kind, problem.line, problem.offset) == ("too_long", 3, starts[2])
    assert (
        problem.reason == "line is 5000 bytes, longer than any record (at most 1000 bytes); skipped"
    )
    assert problem.raw == junk[:200]
    assert (reader.end_offset, reader.end_line, reader.last_seq, reader.tail) == (
        path.stat().st_size,
        4,
        2,
        "clean",
    )


def test_a_record_of_exactly_the_limit_is_read(tmp_path: Path, small_limits: int) -> None:
    def tags(seq: int, note: str) -> bytes:
        return frame({"v": 1, "s": seq, "t": T0, "k": "tags", "d": {"note": note}})

    note = "n" * (small_limits - len(tags(1, "")) + 1)
    line = tags(1, note)
    assert len(line) == small_limits + 1  # the newline is not counted
    longer = tags(2, note + "n")
    path = write(tmp_path / "s.jsonl", frame(HEADER), line, longer, metric(3))
    items = list(SegmentReader(path))
    assert kinds(items) == ["Event 0", "Event 1", "too_long", "sequence", "Event 3"]
    start = len(frame(HEADER))
    assert items[1] == Event(1, T0, "tags", orjson.loads(line), 2, start, start + len(line))
    assert (items[2].line, items[2].offset) == (3, start + len(line))


def test_nuls_then_a_too_long_rest_and_garbage_then_nuls_then_a_record(
    tmp_path: Path, small_limits: int
) -> None:
    head = frame(HEADER) + metric(1)
    line3 = b"y" * 3000 + b"\x00" * 3000 + metric(2)  # garbage counts with the hole
    line4 = b"\x00" * 3000 + b"z" * 3000 + b"\n"  # what follows the NULs is too long
    path = write(tmp_path / "s.jsonl", head, line3, line4, metric(3))
    items = list(SegmentReader(path))
    assert kinds(items) == [
        "Event 0",
        "Event 1",
        "nul_hole",
        "Event 2",
        "nul_hole",
        "too_long",
        "Event 3",
    ]
    hole, record, hole2, long = items[2], items[3], items[4], items[5]
    assert isinstance(hole, Problem) and isinstance(hole2, Problem) and isinstance(long, Problem)
    assert (hole.line, hole.offset, hole.raw) == (3, len(head), b"y" * 200)
    assert hole.reason.startswith("3000 NUL bytes")
    assert (record.line, record.offset) == (3, len(head) + 6000)
    assert (hole2.line, hole2.offset, hole2.raw) == (4, len(head) + len(line3), b"\x00" * 200)
    assert (long.line, long.offset) == (4, len(head) + len(line3) + 3000)
    assert long.reason.startswith("rest of the line after the NULs is 3000 bytes")
    assert long.raw == b"z" * 200


def test_an_unfinished_tail_longer_than_the_limit_waits_for_its_end(
    tmp_path: Path, small_limits: int
) -> None:
    head = frame(HEADER) + metric(1)
    path = write(tmp_path / "s.jsonl", head, b"w" * 4000)
    events, problems, reader = read(path)
    assert (len(events), problems, reader.tail, reader.end_offset) == (
        2,
        [],
        "unfinished",
        len(head),
    )
    # The line ends later; the next pass, from the saved position, reports it once.
    with open(path, "ab") as fh:
        fh.write(b"w" * 4000 + b"\n" + metric(2))
    more, problems, again = read(path, offset=reader.end_offset, line=2, last_seq=1)
    assert [(p.kind, p.line, p.offset) for p in problems] == [("too_long", 3, len(head))]
    assert [(e.seq, e.line) for e in more] == [(2, 4)] and again.tail == "clean"


def test_stopping_after_any_item_among_long_lines_loses_and_repeats_nothing(
    tmp_path: Path, small_limits: int
) -> None:
    path = write(
        tmp_path / "s.jsonl",
        frame(HEADER),
        metric(1),
        b"q" * 2000 + b"\n",
        b"\x00" * 500 + metric(2),
        b"a" * 900 + b"\n",
        metric(3),
    )
    everything = list(SegmentReader(path))
    assert kinds(everything) == [
        "Event 0",
        "Event 1",
        "too_long",
        "nul_hole",
        "Event 2",
        "corrupt",
        "Event 3",
    ]
    for stop in range(1, len(everything) + 1):
        reader = SegmentReader(path)
        head: list[Event | Problem] = []
        for item in reader:
            head.append(item)
            if len(head) == stop:
                break
        state = {"offset": reader.end_offset, "line": reader.end_line, "last_seq": reader.last_seq}
        tail = list(SegmentReader(path, **state))
        if stop == 4:  # between the NUL report and the record of its line: the report repeats
            assert head + tail[1:] == everything
        else:
            assert head + tail == everything, stop


# How a segment is made of lines, for the chunk-size property below.
piece = st.one_of(
    st.integers(1, 40).map(lambda seq: metric(seq)),
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
    st.integers(1, 400).map(lambda n: b"\x00" * n),
    st.integers(1, 400).map(lambda n: b"{" * n),
    st.just(b"\n"),
)


@FUZZ
@given(body=st.lists(piece, max_size=30), chunk=st.integers(1, 700))
def test_the_items_do_not_depend_on_how_the_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: list[bytes], chunk: int
) -> None:
    # Lines that end in the read they begin in and lines carried across reads are one code path
    # as far as anyone can tell: the same items, positions and reports, for any read size.
    path = write(tmp_path / "s.jsonl", frame(HEADER), *body)
    whole = SegmentReader(path)
    expected = list(whole)  # the whole file in one read
    with monkeypatch.context() as patch:
        patch.setattr(spool_reader, "_CHUNK", chunk)
        pieces = SegmentReader(path)
        assert list(pieces) == expected
    assert (pieces.end_offset, pieces.end_line, pieces.last_seq, pieces.tail) == (
        whole.end_offset,
        whole.end_line,
        whole.last_seq,
        whole.tail,
    )


# -- the envelope and the header: every field range-checked ----------------------------------


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),  # beyond int64 too
        st.sampled_from([INT64_MAX, INT64_MAX + 1, 2**64, -1, -(2**63) - 1, 0, 1]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(sorted(KINDS)),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    )


envelope_key = st.sampled_from(["v", "s", "t", "k", "format", "run", "pid", "host", "segment"])
records = st.dictionaries(envelope_key | st.text(max_size=4), json_values(), max_size=8)
# Mostly envelopes that are nearly right, so that each check is reached.
near = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, True, 1.0, "1"]), "s": json_values(), "t": json_values()},
    optional={"k": st.sampled_from([*sorted(KINDS), "nope", 1]), "d": json_values()},
)


def check_items(path: Path) -> list[Event | Problem]:
    """Items of ``path``, checked; the reader may raise only its two documented errors.

    ``read_header`` and the iterator agree: the same error, or the same header.
    """
    try:
        header = read_header(path)
    except (SpoolCorrupt, UnsupportedSpoolVersion) as exc:
        with pytest.raises(type(exc)) as raised:
            list(SegmentReader(path))
        assert str(raised.value) == str(exc)
        return []
    reader = SegmentReader(path)
    items = list(reader)
    assert reader.header == header
    for item in items:
        assert type(item) in (Event, Problem)
        if isinstance(item, Event):
            assert type(item.seq) is int and 0 <= item.seq <= INT64_MAX
            assert type(item.t) is int and 0 <= item.t <= INT64_MAX
            assert item.kind in KINDS and item.data["k"] == item.kind
            assert type(item.data["v"]) is int
    return items


@FUZZ
@given(lines=st.lists(records | near, max_size=6))
@example(lines=[{"v": 1, "s": 1, "t": 2**63, "k": "metrics", "step": 0, "d": {"m": 1.0}}])
@example(lines=[{"v": [1], "s": 1, "t": 1, "k": "heartbeat"}])
@example(lines=[{"v": {}, "s": 1, "t": 1, "k": "heartbeat"}])
@example(lines=[{"v": 1, "s": 2**64, "t": 1, "k": "heartbeat"}])
def test_checksummed_records_of_any_json_are_events_in_range_or_problems(
    tmp_path: Path, lines: list[dict[str, Any]]
) -> None:
    path = write(tmp_path / "s.jsonl", frame(HEADER), *(frame_any(r) for r in lines))
    items = check_items(path)
    assert len(items) >= 1 + len(lines)  # the header, then at least one item per line


@FUZZ
@given(header=records | near.map(lambda r: {**r, "k": "segment", "format": 1, "run": "r"}))
@example(header={"v": 1, "s": 0, "t": 1, "k": "segment", "format": [1], "run": "r"})
@example(header={"v": 1, "s": 0, "t": 1, "k": "segment", "format": True, "run": "r"})
@example(header={"v": 1, "s": 0, "t": 2**63, "k": "segment", "format": 1, "run": "r"})
@example(header={"v": 1, "s": 0, "t": 1, "k": "segment", "format": 1, "run": "r", "pid": []})
def test_a_header_of_any_json_is_read_or_refused_with_a_spool_error(
    tmp_path: Path, header: dict[str, Any]
) -> None:
    path = write(tmp_path / "s.jsonl", frame_any(header), metric(1))
    items = check_items(path)
    if not items:
        return  # refused, alike by both
    got = read_header(path)
    assert got is not None
    # Accepted: the iterator returns the same header as its first event, envelope in range.
    assert items[0] == Event(0, header["t"], "segment", got, 1, 0, len(frame_any(header)))
    assert got["run"] == header["run"] and type(got["run"]) is str
    assert got["format"] == 1 and got["s"] == 0 and got["run"]


@FUZZ
@given(data=st.binary(max_size=2000), after_header=st.booleans())
@example(data=b"\x00" * 100, after_header=False)
@example(data=b"{" + b"x" * 100, after_header=False)
def test_arbitrary_bytes_are_events_problems_or_a_spool_error(
    tmp_path: Path, data: bytes, after_header: bool
) -> None:
    path = write(tmp_path / "s.jsonl", frame(HEADER) if after_header else b"", data)
    check_items(path)


# -- the header: what the iterator and read_header say, and when -----------------------------

BAD_HEADERS = {
    "format missing": ({**HEADER, "format": None}, SpoolCorrupt, "has no integer format"),
    "format a list": ({**HEADER, "format": [1]}, SpoolCorrupt, "has no integer format"),
    "format true": ({**HEADER, "format": True}, SpoolCorrupt, "has no integer format"),
    "format a string": ({**HEADER, "format": "1"}, SpoolCorrupt, "has no integer format"),
    "format 3": ({**HEADER, "format": 3}, UnsupportedSpoolVersion, "version 3 is not supported"),
    "t beyond int64": ({**HEADER, "t": 2**63}, SpoolCorrupt, f"time t {2**63} is outside"),
    "t negative": ({**HEADER, "t": -5}, SpoolCorrupt, "time t -5 is outside"),
    "v unknown": ({**HEADER, "v": 9}, UnsupportedSpoolVersion, "record format version 9"),
    "s not 0": ({**HEADER, "s": 4}, SpoolCorrupt, "has sequence number 4, not 0"),
    "run empty": ({**HEADER, "run": ""}, SpoolCorrupt, "names no run"),
    "run a number": ({**HEADER, "run": 12}, SpoolCorrupt, "names no run"),
    "pid a bool": ({**HEADER, "pid": True}, SpoolCorrupt, "pid is True, not a process id"),
    "pid negative": ({**HEADER, "pid": -1}, SpoolCorrupt, "pid is -1, not a process id"),
    "host a list": ({**HEADER, "host": ["h"]}, SpoolCorrupt, "host is ['h'], not a string"),
    "forked_from a number": ({**HEADER, "forked_from": 3}, SpoolCorrupt, "forked_from is 3"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_a_header_with_a_bad_field_is_refused_by_both_readers_alike(
    tmp_path: Path, name: str
) -> None:
    header, error, words = BAD_HEADERS[name]
    if header.get("format", 0) is None:
        del header["format"]
    path = write(tmp_path / "s.jsonl", frame_any(header), metric(1))
    with pytest.raises(error) as by_iterator:
        list(SegmentReader(path))
    with pytest.raises(error) as by_read_header:
        read_header(path)
    assert str(by_iterator.value) == str(by_read_header.value)
    assert str(by_iterator.value).startswith(f"{path}")
    assert words in str(by_iterator.value)


@pytest.mark.parametrize(
    "first",
    [
        b"\x00" * 4096,  # a zero-filled block where the header should be
        b"garbage without an end",
        b"{" + b"x" * (1 << 16),  # no header is this long
    ],
    ids=["nul-block", "garbage", "too-long"],
)
def test_an_unfinished_first_line_that_cannot_become_a_header_is_corrupt(
    tmp_path: Path, first: bytes
) -> None:
    path = write(tmp_path / "s.jsonl", first)
    with pytest.raises(SpoolCorrupt) as by_iterator:
        list(SegmentReader(path))
    with pytest.raises(SpoolCorrupt) as by_read_header:
        read_header(path)
    assert str(by_iterator.value) == str(by_read_header.value)
    assert str(by_iterator.value).startswith(f"{path}:1: the first line is not a segment header")


@pytest.mark.parametrize("offset_line", [False, True])
def test_the_header_is_known_before_the_first_item(tmp_path: Path, offset_line: bool) -> None:
    path = write(tmp_path / "s.jsonl", frame(HEADER), metric(1), metric(2))
    state = {"offset": len(frame(HEADER)) + len(metric(1)), "line": 2, "last_seq": 1}
    reader = SegmentReader(path, **state) if offset_line else SegmentReader(path)
    assert reader.header is None
    first = next(iter(reader))
    assert reader.header == read_header(path) and reader.header is not None
    assert reader.header["run"] == "run0"
    assert isinstance(first, Event) and first.seq == (2 if offset_line else 0)


def test_the_limit_is_above_the_longest_event_the_tracker_writes() -> None:
    # 1000 params of 6000 characters JSON escapes to 6 bytes each, 250-character keys of
    # 4-byte letters: what the limit is chosen to hold (docs/spool-format.md).
    value = "\x01" * 6000
    key = "𝔘" * 250
    params = {
        "v": 1,
        "s": 1,
        "t": T0,
        "k": "params",
        "d": {f"{key[:-3]}{i:03}": value for i in range(1000)},
    }
    assert 36_000_000 < len(frame(params)) < MAX_LINE_BYTES
