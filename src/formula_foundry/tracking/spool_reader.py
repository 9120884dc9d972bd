"""Read complete, verified events of one segment from a byte offset.

The reader's contract (what each outcome means for whoever consumes it):

* **clean end** — every byte up to the end of the file was a complete line: ``tail`` is
  ``"clean"``.
* **unfinished tail** — the file ends with bytes not (yet) terminated by ``\\n``: a writer is
  still in the middle of a line, or died in it. ``tail`` is ``"unfinished"``; ``end_offset``
  stops before those bytes, so a later pass retries from there. Never an error. However long
  the tail, a pass reads it once in bounded memory.
* **corrupt line followed by more data** — a newline-terminated line that is not valid JSON,
  fails its checksum, or is not an object: a :class:`Problem` (path, line, offset, reason) is
  yielded and reading goes on with the next line.
* **invalid envelope** — a checksummed object whose ``v`` is not an integer, whose ``s`` or
  ``t`` is not an integer in [0, 2**63-1], or whose ``k`` is unknown: an ``invalid``
  :class:`Problem` naming the field, never an :class:`Event`.
* **line too long** — a line longer than :data:`MAX_LINE_BYTES`: one ``too_long``
  :class:`Problem`; its bytes are counted, not kept, and reading goes on with the next line.
* **NUL hole** — a run of NUL bytes (a shared filesystem's zero-filled block after a client
  crash): reported as a :class:`Problem` and skipped, in bounded memory however long; if a
  valid record follows the NULs on the same line it is still returned.
* **sequence gap** — a record whose sequence number does not follow the previous one: a
  ``sequence`` :class:`Problem` (records were lost), then the record itself.
* **unknown format version** — a segment header with a version this release cannot read raises
  :class:`~formula_foundry.errors.UnsupportedSpoolVersion`; a single record with an unknown
  version is a :class:`Problem`.
* **broken header** — a complete first line that is not a valid segment header (any field
  ill-typed or out of range), or an unfinished one no header can begin with, raises
  :class:`~formula_foundry.errors.SpoolCorrupt`; an empty file or an unfinished header yields
  nothing (``header`` stays ``None``). :func:`read_header` and the iterator agree.

Nothing in a file makes the reader raise anything else (but ``OSError`` reading it). It never
writes: a sync host needs only read access to the spools. The format: ``docs/spool-format.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal, NamedTuple

import orjson

from formula_foundry.errors import SpoolCorrupt, UnsupportedSpoolVersion
from formula_foundry.tracking.events import (
    INT64_MAX,
    K_SEGMENT,
    KINDS,
    MAX_LINE_BYTES,
    SUPPORTED_VERSIONS,
    checksum_ok,
)

# The longest line the reader accepts. The tracker limits each value, not how many keys one
# call logs, so a valid event is as long as a call makes it: 1000 params of 6000 characters
# that JSON escapes to 6 bytes each (control characters) are 37 MB, 1000 tags of 8000 are
# 49 MB; real ones are far smaller (100 params of 6000 ASCII characters: 0.6 MB). 64 MiB
# keeps every one of them, and bounds the memory a line without an end can take.

# A line that ends in the read it begins in is never too long: _CHUNK <= MAX_LINE_BYTES.
_CHUNK: Final = 1 << 20
_RAW_LIMIT: Final = 200
# A header is well under 1 KiB; a first line this long without an end is not one.
_HEADER_LIMIT: Final = 1 << 16
_NUL: Final = b"\x00"

ProblemKind = Literal[
    "corrupt", "checksum", "nul_hole", "version", "sequence", "invalid", "too_long"
]


class Event(NamedTuple):
    """One verified record. ``line`` is 1-based; ``offset``/``end`` are byte positions.

    A named tuple: as immutable as a frozen dataclass, built in a seventh of the time (one per
    spooled event: a frozen dataclass's ``__init__`` was ~7 % of a bulk sync pass)."""

    seq: int
    t: int
    kind: str
    data: dict[str, Any]
    line: int
    offset: int
    end: int


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in the segment that is not a valid event, and where it is."""

    path: Path
    line: int
    offset: int
    kind: ProblemKind
    reason: str
    raw: bytes = b""

    def describe(self) -> str:
        return f"{self.path}:{self.line} (byte {self.offset}): {self.reason}"


def read_header(path: Path) -> dict[str, Any] | None:
    """Return the segment's header, or ``None`` if it is not complete yet."""
    with open(path, "rb") as fh:
        return _read_header(fh, path)


def _read_header(fh: IO[bytes], path: Path) -> dict[str, Any] | None:
    """The header on the first line of ``fh`` (read from the start); the iterator's too."""
    first = fh.readline(_HEADER_LIMIT)
    if first.endswith(b"\n"):
        return _parse_header(path, first[:-1])
    # Unfinished: a writer may be writing it, unless no header could begin like this.
    if len(first) == _HEADER_LIMIT:
        why = f"longer than {_HEADER_LIMIT} bytes without an end"
        raise SpoolCorrupt(f"{path}:1: the first line is not a segment header ({why})")
    if first and (first[:1] != b"{" or _NUL in first):
        raise SpoolCorrupt(f"{path}:1: the first line is not a segment header")
    return None


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        rec = None
    if type(rec) is not dict or rec.get("k") != K_SEGMENT:
        raise SpoolCorrupt(f"{path}:1: the first line is not a segment header")
    version = rec.get("format")
    if type(version) is not int:
        shown = _show(rec, "format")
        raise SpoolCorrupt(f"{path}:1: the segment header has no integer format ({shown})")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSpoolVersion(
            f"{path}: spool format version {version!r} is not supported by this "
            f"formula-foundry (reads {sorted(SUPPORTED_VERSIONS)}); upgrade formula-foundry"
        )
    if not checksum_ok(line):
        raise SpoolCorrupt(f"{path}:1: the segment header fails its checksum")
    why = _envelope_problem(rec)
    if why is not None:
        error = UnsupportedSpoolVersion if why[0] == "version" else SpoolCorrupt
        raise error(f"{path}:1: the segment header is not valid: {why[1]}")
    if rec["s"] != 0:
        raise SpoolCorrupt(f"{path}:1: the segment header has sequence number {rec['s']}, not 0")
    run = rec.get("run")
    if type(run) is not str or not run:
        raise SpoolCorrupt(f"{path}:1: the segment header names no run")
    for name in ("host", "segment", "forked_from"):
        if name in rec and type(rec[name]) is not str and rec[name] is not None:
            raise SpoolCorrupt(
                f"{path}:1: the segment header's {name} is {_show(rec, name)}, not a string"
            )
    pid = rec.get("pid")
    if pid is not None and not (type(pid) is int and 0 <= pid <= INT64_MAX):
        raise SpoolCorrupt(
            f"{path}:1: the segment header's pid is {_show(rec, 'pid')}, not a process id"
        )
    return rec


def _show(rec: dict[str, Any], key: str) -> str:
    """A short spelling of ``rec[key]`` for a reason (a value from a spool can be huge)."""
    if key not in rec:
        return "missing"
    text = repr(rec[key])
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} characters)"


def _envelope_problem(rec: dict[str, Any]) -> tuple[ProblemKind, str] | None:
    """Why the envelope of ``rec`` is not one this reader accepts, or None if it is (the test
    ``SegmentReader._lines`` inlines for the common, valid case)."""
    version = rec.get("v")
    if type(version) is not int:
        return "invalid", f"record format version v is {_show(rec, 'v')}, not an integer"
    if version not in SUPPORTED_VERSIONS:
        return "version", (
            f"record format version {version!r} is not supported (reads "
            f"{sorted(SUPPORTED_VERSIONS)}); upgrade formula-foundry"
        )
    for key, what in (("s", "sequence number s"), ("t", "time t")):
        value = rec.get(key)
        if type(value) is not int:
            return "invalid", f"record {what} is {_show(rec, key)}, not an integer"
        if not 0 <= value <= INT64_MAX:
            return "invalid", f"record {what} {value} is outside [0, {INT64_MAX}]"
    kind = rec.get("k")
    if type(kind) is not str or kind not in KINDS:
        return "invalid", f"record kind k {_show(rec, 'k')} is not one of {sorted(KINDS)}"
    return None


def _nul_hole(path: Path, lineno: int, offset: int, count: int, raw: bytes) -> Problem:
    reason = f"{count} NUL bytes (a hole left by a crashed shared-filesystem client)"
    return Problem(path, lineno, offset, "nul_hole", reason, raw)


class _LongLine:
    """A line not ended within the chunk it began in, kept in bounded memory.

    Only the bytes after a line's last NUL can still be a record (a NUL never occurs in one),
    so NULs and what precedes them are counted, not kept; and the bytes after them are kept
    only while they can still be a record (at most ``MAX_LINE_BYTES``).
    """

    __slots__ = ("head", "nuls", "offset", "parts", "rest", "rest_head")

    def __init__(self, offset: int) -> None:
        self.offset = offset  # where the line begins in the file
        self.head = b""  # its first bytes, for reports
        self.nuls = 0
        self.parts: list[bytes] = []  # the bytes after the last NUL, while they may be kept
        self.rest = 0  # how many bytes follow the last NUL (or begin the line), kept or not
        self.rest_head = b""

    def add(self, piece: bytes) -> None:
        if len(self.head) < _RAW_LIMIT:
            self.head += piece[: _RAW_LIMIT - len(self.head)]
        last = piece.rfind(_NUL)
        if last >= 0:
            self.nuls += piece.count(_NUL, 0, last + 1)
            piece = piece[last + 1 :]
            self.parts, self.rest, self.rest_head = [], 0, b""
        if len(self.rest_head) < _RAW_LIMIT:
            self.rest_head += piece[: _RAW_LIMIT - len(self.rest_head)]
        self.rest += len(piece)
        if self.rest <= MAX_LINE_BYTES:
            self.parts.append(piece)
        elif self.parts:
            self.parts = []  # too long to be a record: from now on only counted

    def finish(
        self, reader: SegmentReader, piece: bytes, end: int, lineno: int
    ) -> list[Event | Problem]:
        """The items of the line, ended by ``piece`` and the newline before ``end``."""
        self.add(piece)
        if not self.nuls and self.rest <= MAX_LINE_BYTES:
            return reader._parse(b"".join(self.parts), self.offset, end, lineno)
        out: list[Event | Problem] = []
        path = reader.path
        if self.nuls:
            raw = self.head if self.rest else self.head.rstrip(_NUL)
            out.append(_nul_hole(path, lineno, self.offset, self.nuls, raw))
        offset = end - 1 - self.rest
        if self.rest > MAX_LINE_BYTES:
            what = "line" if offset == self.offset else "rest of the line after the NULs"
            why = f"{what} is {self.rest} bytes, longer than any record (at most {MAX_LINE_BYTES}"
            why += " bytes); skipped"
            out.append(Problem(path, lineno, offset, "too_long", why, self.rest_head))
        elif self.rest:
            out.extend(reader._parse(b"".join(self.parts), offset, end, lineno))
        return out


class SegmentReader:
    """Iterate ``Event``/``Problem`` items of ``path`` from ``offset``.

    ``line`` is the number of lines before ``offset`` and ``last_seq`` the sequence number of
    the event just before it (both as recorded by a previous pass), so line numbers in
    reports and the sequence-gap check stay right when resuming mid-file. After iteration,
    ``end_offset``/``end_line``/``last_seq`` say where the next pass starts, and ``tail`` is
    ``"clean"`` or ``"unfinished"``. ``header`` is set (the header checked) before the first
    item is handed out, on every pass, whatever ``offset``.

    The three are also right *while* iterating: when an item is handed out they already
    cover it, so a consumer that stops after any item (a batch is full) and saves them
    resumes with the next item — never a duplicate, never a gap. (The one exception is a
    line that yields two items, e.g. a NUL-hole report and the record after the NULs: after
    the first of them the position is still the start of the line, so a resumed pass reports
    it again rather than lose the record.) Reading takes time linear in the bytes read and
    memory bounded by ``MAX_LINE_BYTES`` whatever the file holds (longer lines are counted).
    """

    def __init__(self, path: Path, offset: int = 0, line: int = 0, last_seq: int = -1) -> None:
        self.path = path
        self.header: dict[str, Any] | None = None
        self.end_offset, self.end_line, self.last_seq = offset, line, last_seq
        self.tail: Literal["clean", "unfinished"] = "clean"

    def __iter__(self) -> Iterator[Event | Problem]:
        with open(self.path, "rb") as fh:
            self.header = _read_header(fh, self.path)
            if self.header is None:
                self.tail = "unfinished" if fh.tell() else "clean"
                return
            fh.seek(self.end_offset)
            base = self.end_offset  # the file offset of chunk[0]
            long: _LongLine | None = None
            while chunk := fh.read(_CHUNK):
                start = 0
                if long is not None:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        long.add(chunk)
                        base += len(chunk)
                        continue
                    end = base + nl + 1
                    items = long.finish(self, chunk[:nl], end, self.end_line + 1)
                    yield from self._hand_out(items, end)
                    long, start = None, nl + 1
                last = chunk.rfind(b"\n")
                if last >= start:
                    yield from self._lines(chunk[start:last], base + start)
                    start = last + 1
                if start < len(chunk):
                    long = _LongLine(base + start)
                    long.add(chunk[start:] if start else chunk)
                base += len(chunk)
            # An unfinished tail stays unread (end_offset before it) for the next pass.
            self.tail = "unfinished" if long is not None else "clean"

    def _lines(self, body: bytes, offset: int) -> Iterator[Event | Problem]:
        """The items of ``body`` (whole lines, its last newline cut off) from ``offset``.

        An intact record following the one before becomes its Event here, by :meth:`_parse`'s
        test for a line of one Event and nothing else; any other line goes to :meth:`_parse`,
        which says what is wrong (a line with a NUL always does: orjson refuses a raw NUL)."""
        crc, loads, decode_error = zlib.crc32, orjson.loads, orjson.JSONDecodeError
        versions, kinds, new = SUPPORTED_VERSIONS, KINDS, tuple.__new__
        lineno, prev = self.end_line, self.last_seq
        seq: Any  # and t: ints once checked below
        t: Any
        for line in body.split(b"\n"):
            lineno += 1
            end = offset + len(line) + 1
            # events.checksum_ok inlined: ,"c":"<8 hex digits>"} (a call is ~2 % of a bulk pass)
            framed = len(line) >= 18 and line[-2:] == b'"}' and line[-16:-10] == b',"c":"'
            if framed and line[-10:-2] == b"%08x" % crc(line[:-16]):
                try:
                    rec = loads(line)
                except decode_error:
                    rec = None
                if type(rec) is dict:
                    # _envelope_problem's test, and no gap (after none read: to _parse).
                    version, seq, t, kind = rec.get("v"), rec.get("s"), rec.get("t"), rec.get("k")
                    typed = type(version) is int and type(seq) is int and type(t) is int
                    known = typed and type(kind) is str and version in versions and kind in kinds
                    if known and 0 <= seq <= INT64_MAX and 0 <= t <= INT64_MAX and seq - prev == 1:
                        # Past the line before handing it out (see the class docstring).
                        self.end_line, self.end_offset, self.last_seq = lineno, end, seq
                        prev = seq
                        yield new(Event, (seq, t, kind, rec, lineno, offset, end))
                        offset = end
                        continue
            yield from self._hand_out(self._parse(line, offset, end, lineno), end)
            prev = self.last_seq
            offset = end

    def _hand_out(self, items: list[Event | Problem], end: int) -> Iterator[Event | Problem]:
        """The items of one line, the reader moved past the line before its last one."""
        if len(items) > 1:
            yield from items[:-1]
        self.end_line += 1
        self.end_offset = end
        if type(last := items[-1]) is Event:
            self.last_seq = last.seq
        yield last

    def _parse(self, line: bytes, offset: int, end: int, lineno: int) -> list[Event | Problem]:
        """The items of one line (at least one): Problems, then at most one Event last."""
        out: list[Event | Problem] = []
        if _NUL in line:
            after = line[line.rfind(_NUL) + 1 :]
            raw = line[:_RAW_LIMIT] if after else line[:_RAW_LIMIT].rstrip(_NUL)
            out.append(_nul_hole(self.path, lineno, offset, line.count(_NUL), raw))
            if not after:
                return out
            offset = end - 1 - len(after)
            line = after
        why: tuple[ProblemKind, str] | None
        try:
            rec, error = orjson.loads(line), None
        except orjson.JSONDecodeError as exc:
            rec, error = None, str(exc).split(":", 1)[0]
        if not checksum_ok(line):
            why = "checksum", "checksum mismatch or missing"
            if error is not None:
                why = "corrupt", f"not valid JSON ({error})"
        elif error is not None:
            why = "corrupt", "not valid JSON"
        elif type(rec) is not dict:
            why = "corrupt", "not a JSON object"
        else:
            why = _envelope_problem(rec)
        if why is not None:
            out.append(Problem(self.path, lineno, offset, *why, line[:_RAW_LIMIT]))
            return out
        seq = rec["s"]
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            reason = f"sequence jumps from {self.last_seq} to {seq} (records lost or reordered)"
            out.append(Problem(self.path, lineno, offset, "sequence", reason))
        out.append(Event(seq, rec["t"], rec["k"], rec, lineno, offset, end))
        return out


def iter_segment(path: Path, offset: int = 0) -> Iterator[Event | Problem]:
    """Convenience: iterate a whole segment (or from ``offset``) with a fresh reader."""
    return iter(SegmentReader(path, offset))
