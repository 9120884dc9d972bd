"""The reader's contract (see spool_reader's docstring), proved on real, damaged segment files."""

from __future__ import annotations

from pathlib import Path

import pytest

from formula_foundry.errors import SpoolCorrupt, UnsupportedSpoolVersion
from formula_foundry.tracking.events import frame
from formula_foundry.tracking.spool_reader import (
    Event,
    Problem,
    SegmentReader,
    iter_segment,
    read_header,
)
from formula_foundry.tracking.spool_writer import SegmentWriter

from ._helpers import read, read_clean


def metric(i: int) -> dict[str, object]:
    return {
        "v": 1,
        "s": 0,
        "t": 1_700_000_000_000 + i,
        "k": "metrics",
        "step": i,
        "d": {"m": i / 4},
    }


def make_segment(root: Path, n: int = 6) -> Path:
    """A real segment written by SegmentWriter: a header and ``n`` metric events."""
    writer = SegmentWriter(root, "run0", "write")
    for i in range(1, n + 1):
        writer.append(metric(i))
    writer.close()
    assert writer.path is not None
    return writer.path


def line_starts(data: bytes) -> list[int]:
    """Byte offset of each newline-terminated line."""
    starts, pos = [], 0
    while (nl := data.find(b"\n", pos)) >= 0:
        starts.append(pos)
        pos = nl + 1
    return starts


def copy_with(tmp_path: Path, data: bytes, name: str = "damaged.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_reads_every_event_with_its_line_and_byte_positions(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 6)
    data = path.read_bytes()
    events, problems, reader = read(path)
    assert problems == []
    assert [e.seq for e in events] == list(range(7))
    assert events[0].kind == "segment" and events[0].data["run"] == "run0"
    assert [e.data["step"] for e in events[1:]] == [1, 2, 3, 4, 5, 6]
    starts = line_starts(data)
    assert [e.line for e in events] == list(range(1, 8))
    assert [e.offset for e in events] == starts
    assert [e.end for e in events] == [*starts[1:], len(data)]
    for e in events:
        assert data[e.offset : e.end] == frame({k: v for k, v in e.data.items() if k != "c"})
    assert reader.header is not None and reader.header["format"] == 1
    assert (reader.end_offset, reader.end_line, reader.last_seq, reader.tail) == (
        len(data),
        7,
        6,
        "clean",
    )
    assert [i for i in iter_segment(path)] == events


def test_an_empty_file_is_a_clean_end_without_header(tmp_path: Path) -> None:
    path = copy_with(tmp_path, b"")
    events, problems, reader = read(path)
    assert (events, problems, reader.header, reader.tail, reader.end_offset) == (
        [],
        [],
        None,
        "clean",
        0,
    )
    assert read_header(path) is None


def test_cut_at_every_byte_of_the_last_line(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 4)
    data = path.read_bytes()
    full = read_clean(path)
    last_start = line_starts(data)[-1]
    for cut in range(last_start, len(data) + 1):
        part = copy_with(tmp_path, data[:cut], f"cut-{cut}.jsonl")
        events, problems, reader = read(part)
        assert problems == [], cut
        if cut == len(data):
            assert events == full and reader.tail == "clean"
            continue
        assert events == full[:-1], cut
        assert reader.tail == ("clean" if cut == last_start else "unfinished"), cut
        assert reader.end_offset == last_start
        # The writer finishes the line; the next pass from the saved state returns just it.
        part.write_bytes(data)
        more, problems, again = read(
            part, offset=reader.end_offset, line=reader.end_line, last_seq=reader.last_seq
        )
        assert problems == [] and more == full[-1:] and again.tail == "clean"


def test_cut_at_every_byte_of_the_header(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 1)
    data = path.read_bytes()
    for cut in range(data.index(b"\n") + 1):
        part = copy_with(tmp_path, data[:cut], f"cut-{cut}.jsonl")
        events, problems, reader = read(part)
        assert (events, problems, reader.header) == ([], [], None)
        assert reader.tail == ("unfinished" if cut else "clean")
        assert read_header(part) is None


def test_a_nul_hole_over_one_line_is_reported_and_skipped(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 6)
    data = path.read_bytes()
    starts = line_starts(data)
    # Line 4 (event seq 3) becomes zeros, its newline kept.
    hole = bytearray(data)
    hole[starts[3] : starts[4] - 1] = bytes(starts[4] - 1 - starts[3])
    events, problems, reader = read(copy_with(tmp_path, bytes(hole)))
    assert [e.seq for e in events] == [0, 1, 2, 4, 5, 6]
    assert [e.line for e in events] == [1, 2, 3, 5, 6, 7]
    assert [(p.kind, p.line, p.offset) for p in problems] == [
        ("nul_hole", 4, starts[3]),
        ("sequence", 5, starts[4]),
    ]
    assert problems[0].reason == (
        f"{starts[4] - 1 - starts[3]} NUL bytes (a hole left by a crashed shared-filesystem client)"
    )
    assert problems[1].reason == "sequence jumps from 2 to 4 (records lost or reordered)"
    assert reader.tail == "clean" and reader.last_seq == 6


def test_a_nul_hole_across_lines_is_reported_at_the_line_it_makes(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 7)
    data = path.read_bytes()
    starts = line_starts(data)
    # Zeros from the middle of line 3 to the middle of line 5: two newlines vanish.
    a, b = starts[2] + 10, starts[4] + 10
    damaged = data[:a] + bytes(b - a) + data[b:]
    events, problems, _ = read(copy_with(tmp_path, damaged))
    assert [e.seq for e in events] == [0, 1, 5, 6, 7]
    assert [e.line for e in events] == [1, 2, 4, 5, 6]
    kinds = [(p.kind, p.line) for p in problems]
    # The hole, then the rest of line 5 (no valid record), then the gap in the sequence.
    assert kinds == [("nul_hole", 3), ("corrupt", 3), ("sequence", 4)]
    assert problems[0].offset == starts[2] and problems[1].offset == b
    assert problems[0].raw.startswith(data[starts[2] : a] + b"\x00")


def test_a_record_after_a_nul_run_on_the_same_line_is_still_read(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 5)
    data = path.read_bytes()
    starts = line_starts(data)
    # Line 3 and its newline become zeros: line 4 now follows the NULs on the same line.
    damaged = data[: starts[2]] + bytes(starts[3] - starts[2]) + data[starts[3] :]
    events, problems, _ = read(copy_with(tmp_path, damaged))
    assert [(e.seq, e.line) for e in events] == [(0, 1), (1, 2), (3, 3), (4, 4), (5, 5)]
    assert events[2].offset == starts[3] and events[2].end == starts[4]
    assert [(p.kind, p.line) for p in problems] == [("nul_hole", 3), ("sequence", 3)]


def test_garbage_lines_in_the_middle_are_problems_with_their_line_numbers(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    junk = [b"garbage\n", b"\n", b'{"v":1,"s":3}\n', b"[1,2,3]\n", b"\xff\xfe\n"]
    damaged = b"".join(
        [*lines[:3], junk[0], junk[1], lines[3], junk[2], junk[3], junk[4], lines[4]]
    )
    events, problems, reader = read(copy_with(tmp_path, damaged))
    assert [(e.seq, e.line) for e in events] == [(0, 1), (1, 2), (2, 3), (3, 6), (4, 10)]
    assert [(p.kind, p.line) for p in problems] == [
        ("corrupt", 4),
        ("corrupt", 5),
        ("checksum", 7),
        ("checksum", 8),
        ("corrupt", 9),
    ]
    assert problems[0].reason.startswith("not valid JSON")
    assert problems[0].raw == b"garbage"
    assert problems[2].reason == "checksum mismatch or missing"
    assert reader.tail == "clean" and reader.end_line == 10
    assert problems[0].describe() == (
        f"{problems[0].path}:4 (byte {problems[0].offset}): {problems[0].reason}"
    )


def test_a_bad_checksum_is_a_problem_and_the_record_is_not_returned(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 4)
    data = path.read_bytes()
    starts = line_starts(data)
    line3 = data[starts[2] : starts[3]]
    assert b'"step":2' in line3
    damaged = data[: starts[2]] + line3.replace(b'"step":2', b'"step":9') + data[starts[3] :]
    events, problems, _ = read(copy_with(tmp_path, damaged))
    assert 9 not in [e.data.get("step") for e in events]
    assert [e.seq for e in events] == [0, 1, 3, 4]
    assert [(p.kind, p.line, p.offset) for p in problems] == [
        ("checksum", 3, starts[2]),
        ("sequence", 4, starts[3]),
    ]


def test_framed_json_that_is_not_an_event_is_an_invalid_problem(tmp_path: Path) -> None:
    # Intact (checksummed) lines whose envelope is ill-typed or out of range: never an Event.
    path = make_segment(tmp_path, 2)
    big = 2**63
    bad = {
        "no_such_kind": "record kind k 'no_such_kind' is not one of",
        "s_str": "record sequence number s is '3', not an integer",
        "t_float": "record time t is 1.5, not an integer",
        "s_missing": "record sequence number s is missing, not an integer",
        "t_int64": f"record time t {big} is outside [0, {big - 1}]",
        "t_negative": f"record time t -1 is outside [0, {big - 1}]",
        "s_int64": f"record sequence number s {big} is outside [0, {big - 1}]",
        "s_bool": "record sequence number s is True, not an integer",
        "v_bool": "record format version v is True, not an integer",
        "v_list": "record format version v is [1], not an integer",
    }
    records = {
        "no_such_kind": {"v": 1, "s": 3, "t": 1, "k": "no_such_kind"},
        "s_str": {"v": 1, "s": "3", "t": 1, "k": "metrics"},
        "t_float": {"v": 1, "s": 3, "t": 1.5, "k": "metrics"},
        "s_missing": {"v": 1, "t": 1, "k": "metrics"},
        "t_int64": {"v": 1, "s": 3, "t": big, "k": "metrics", "step": 0, "d": {"m": 1.0}},
        "t_negative": {"v": 1, "s": 3, "t": -1, "k": "heartbeat"},
        "s_int64": {"v": 1, "s": big, "t": 1, "k": "heartbeat"},
        "s_bool": {"v": 1, "s": True, "t": 1, "k": "heartbeat"},
        "v_bool": {"v": True, "s": 3, "t": 1, "k": "heartbeat"},
        "v_list": {"v": [1], "s": 3, "t": 1, "k": "heartbeat"},
    }
    lines = [frame(records[name]) for name in bad]
    events, problems, reader = read(copy_with(tmp_path, path.read_bytes() + b"".join(lines)))
    assert len(events) == 3
    assert [(p.kind, p.line) for p in problems] == [("invalid", 4 + n) for n in range(len(bad))]
    for problem, (name, reason) in zip(problems, bad.items(), strict=True):
        assert problem.reason.startswith(reason), name
        assert problem.raw == lines[problem.line - 4][:-1][:200]
    assert reader.last_seq == 2 and reader.tail == "clean"


def test_a_record_of_an_unknown_version_is_a_problem(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 3)
    data = path.read_bytes()
    starts = line_starts(data)
    future = frame({"v": 2, "s": 4, "t": 1, "k": "metrics", "new": True})
    damaged = data[: starts[3]] + future + data[starts[3] :]
    events, problems, _ = read(copy_with(tmp_path, damaged))
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert [(p.kind, p.line, p.offset) for p in problems] == [("version", 4, starts[3])]
    assert problems[0].reason == (
        "record format version 2 is not supported (reads [1]); upgrade formula-foundry"
    )


def test_a_header_of_an_unknown_format_version_raises_a_clear_error(tmp_path: Path) -> None:
    header = {"v": 2, "s": 0, "t": 1, "k": "segment", "format": 2, "run": "r"}
    path = copy_with(tmp_path, frame(header) + b'{"v":2,"whatever":"new"}\n')
    message = (
        f"{path}: spool format version 2 is not supported by this formula-foundry "
        "(reads [1]); upgrade formula-foundry"
    )
    with pytest.raises(UnsupportedSpoolVersion) as e:
        list(SegmentReader(path))
    assert str(e.value) == message
    with pytest.raises(UnsupportedSpoolVersion) as e:
        read_header(path)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("first_line", "reason"),
    [
        (b"not json\n", "the first line is not a segment header"),
        (frame({"v": 1, "s": 0, "t": 1, "k": "metrics"}), "the first line is not a segment header"),
        (
            frame({"v": 1, "s": 0, "t": 1, "k": "segment", "format": 1, "run": "r"}).replace(
                b'"t":1', b'"t":2'
            ),
            "the segment header fails its checksum",
        ),
        (
            frame({"v": 1, "s": 0, "t": 1, "k": "segment", "format": 1}),
            "the segment header names no run",
        ),
    ],
)
def test_a_broken_header_raises_spool_corrupt(
    tmp_path: Path, first_line: bytes, reason: str
) -> None:
    path = copy_with(tmp_path, first_line + frame(metric(1)))
    with pytest.raises(SpoolCorrupt) as e:
        list(SegmentReader(path))
    assert str(e.value) == f"{path}:1: {reason}"


def test_a_lost_line_is_a_sequence_problem(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    events, problems, _ = read(copy_with(tmp_path, b"".join(lines[:3] + lines[4:])))
    assert [e.seq for e in events] == [0, 1, 2, 4, 5]
    assert [(p.kind, p.line, p.reason) for p in problems] == [
        ("sequence", 4, "sequence jumps from 2 to 4 (records lost or reordered)")
    ]


def test_resuming_from_a_saved_state_while_the_writer_appends(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "run0", "write")
    for i in range(1, 4):
        writer.append(metric(i))
    assert writer.path is not None
    first, problems, reader = read(writer.path)
    assert problems == [] and [e.seq for e in first] == [0, 1, 2, 3]
    state = {"offset": reader.end_offset, "line": reader.end_line, "last_seq": reader.last_seq}
    assert state == {"offset": writer.path.stat().st_size, "line": 4, "last_seq": 3}
    nothing, problems, again = read(writer.path, **state)
    assert (nothing, problems, again.end_offset) == ([], [], state["offset"])
    for i in range(4, 9):
        writer.append(metric(i))
    writer.close()
    rest, problems, reader = read(writer.path, **state)
    assert problems == []
    assert [(e.seq, e.line) for e in rest] == [(s, s + 1) for s in range(4, 9)]
    assert first + rest == read_clean(writer.path)
    assert reader.header is not None  # the header is checked on every pass


def test_resuming_with_a_wrong_last_seq_reports_the_gap(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 4)
    full = read_clean(path)
    _, problems, _ = read(path, offset=full[2].end, line=3, last_seq=5)
    assert [(p.kind, p.line) for p in problems] == [("sequence", 4)]


def collect(path: Path, stop_after: int) -> tuple[list[Event | Problem], dict[str, int]]:
    reader = SegmentReader(path)
    items: list[Event | Problem] = []
    for item in reader:
        items.append(item)
        if len(items) == stop_after:
            break
    return items, {
        "offset": reader.end_offset,
        "line": reader.end_line,
        "last_seq": reader.last_seq,
    }


def test_stopping_after_any_item_and_resuming_loses_and_repeats_nothing(tmp_path: Path) -> None:
    path = make_segment(tmp_path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = copy_with(tmp_path, b"".join([*lines[:3], b"junk\n", b"more junk\n", *lines[4:]]))
    everything = list(SegmentReader(damaged))
    # 5 events (seq 3 replaced by junk), two junk lines, and the gap, reported with seq 4.
    assert [(type(i).__name__, i.line) for i in everything] == [
        ("Event", 1),
        ("Event", 2),
        ("Event", 3),
        ("Problem", 4),
        ("Problem", 5),
        ("Problem", 6),
        ("Event", 6),
        ("Event", 7),
    ]
    for stop in range(1, len(everything) + 1):
        head, state = collect(damaged, stop)
        tail = list(SegmentReader(damaged, **state))
        if stop == 6:
            # The gap report shares line 6 with its record: it is repeated, nothing is lost.
            assert head + tail[1:] == everything and tail[0] == head[-1]
        else:
            assert head + tail == everything, stop


def test_stopping_inside_a_two_item_line_repeats_the_report_but_keeps_the_record(
    tmp_path: Path,
) -> None:
    path = make_segment(tmp_path, 3)
    data = path.read_bytes()
    starts = line_starts(data)
    damaged = copy_with(tmp_path, data[: starts[2]] + b"\x00" * 8 + data[starts[2] :])
    everything = list(SegmentReader(damaged))
    assert [type(i).__name__ for i in everything] == ["Event", "Event", "Problem", "Event", "Event"]
    head, state = collect(damaged, 3)  # stop after the NUL report, before the record
    tail = list(SegmentReader(damaged, **state))
    assert head + tail[1:] == everything and tail[0] == everything[2]


def test_lines_across_read_chunks(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "run0", "buffered")
    pad = "x" * 200
    for i in range(1, 8001):  # about 2.4 MB: several 1 MiB chunks, lines cut across them
        writer.append({"v": 1, "s": 0, "t": i, "k": "tags", "d": {"pad": pad, "i": str(i)}})
    writer.close()
    assert writer.path is not None
    data = writer.path.read_bytes()
    assert len(data) > 2 * (1 << 20)
    events = read_clean(writer.path)
    assert len(events) == 8001
    assert [e.offset for e in events] == line_starts(data)
    assert [e.data["d"]["i"] for e in events[1:]] == [str(i) for i in range(1, 8001)]
