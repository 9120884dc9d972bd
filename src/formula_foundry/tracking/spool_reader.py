"""Read complete, verified events of one segment from a byte offset.

The reader's contract (what each outcome means for whoever consumes it):

* **clean end** — every byte up to the end of the file was a complete line: ``tail`` is
  ``"clean"``.
* **unfinished tail** — the file ends with bytes not (yet) terminated by ``\\n``: a writer is
  still in the middle of a line, or died in it. ``tail`` is ``"unfinished"``; ``end_offset``
  stops before those bytes, so a later pass retries from there. Never an error.
* **corrupt line followed by more data** — a newline-terminated line that is not valid JSON,
  fails its checksum, or lacks the envelope keys: a :class:`Problem` (path, line, offset,
  reason) is yielded and reading goes on with the next line.
* **NUL hole** — a run of NUL bytes (a shared filesystem's zero-filled block after a client
  crash): reported as a :class:`Problem` and skipped; if a valid record follows the NULs on the
  same line it is still returned.
* **sequence gap** — a record whose sequence number does not follow the previous one: a
  ``sequence`` :class:`Problem` (records were lost), then the record itself.
* **unknown format version** — a segment header with a version this release cannot read raises
  :class:`~formula_foundry.errors.UnsupportedSpoolVersion`; a single record with an unknown
  version is a :class:`Problem`.
* **broken header** — a complete first line that is not a valid segment header raises
  :class:`~formula_foundry.errors.SpoolCorrupt`; an empty file or an unfinished header yields
  nothing (``header`` stays ``None``).

The format itself is documented in ``docs/spool-format.md``.

The reader never writes: a sync host needs only read access to the spools.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from formula_foundry.errors import SpoolCorrupt, UnsupportedSpoolVersion
from formula_foundry.tracking.events import K_SEGMENT, KINDS, SUPPORTED_VERSIONS, checksum_ok

_CHUNK: Final = 1 << 20
_RAW_LIMIT: Final = 200

ProblemKind = Literal["corrupt", "checksum", "nul_hole", "version", "sequence"]


@dataclass(frozen=True, slots=True)
class Event:
    """One verified record. ``line`` is 1-based; ``offset``/``end`` are byte positions."""

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
        first = fh.readline(1 << 16)
    if not first.endswith(b"\n"):
        return None
    return _parse_header(path, first[:-1])


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        rec = None
    if not isinstance(rec, dict) or rec.get("k") != K_SEGMENT:
        raise SpoolCorrupt(f"{path}:1: the first line is not a segment header")
    version = rec.get("format")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSpoolVersion(
            f"{path}: spool format version {version!r} is not supported by this "
            f"formula-foundry (reads {sorted(SUPPORTED_VERSIONS)}); upgrade formula-foundry"
        )
    if not checksum_ok(line):
        raise SpoolCorrupt(f"{path}:1: the segment header fails its checksum")
    if not isinstance(rec.get("run"), str):
        raise SpoolCorrupt(f"{path}:1: the segment header names no run")
    return rec


class SegmentReader:
    """Iterate ``Event``/``Problem`` items of ``path`` from ``offset``.

    ``line`` is the number of lines before ``offset`` and ``last_seq`` the sequence number of
    the event just before it (both as recorded by a previous pass), so line numbers in
    reports and the sequence-gap check stay right when resuming mid-file. After iteration,
    ``end_offset``/``end_line``/``last_seq`` say where the next pass starts, and ``tail`` is
    ``"clean"`` or ``"unfinished"``.

    The three are also right *while* iterating: when an item is handed out they already
    cover it, so a consumer that stops after any item (a batch is full) and saves them
    resumes with the next item — never a duplicate, never a gap. (The one exception is a
    line that yields two items, e.g. a NUL-hole report and the record after the NULs: after
    the first of them the position is still the start of the line, so a resumed pass reports
    it again rather than lose the record.)
    """

    def __init__(self, path: Path, offset: int = 0, line: int = 0, last_seq: int = -1) -> None:
        self.path = path
        self.header: dict[str, Any] | None = None
        self.end_offset = offset
        self.end_line = line
        self.last_seq = last_seq
        self.tail: Literal["clean", "unfinished"] = "clean"

    def __iter__(self) -> Iterator[Event | Problem]:
        path = self.path
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16)
            if not first.endswith(b"\n"):
                self.tail = "unfinished" if first else "clean"
                return
            self.header = _parse_header(path, first[:-1])
            fh.seek(self.end_offset)
            pending = b""
            base = self.end_offset
            parse = self._parse
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                data = pending + chunk if pending else chunk
                start = 0
                find = data.find
                while True:
                    nl = find(b"\n", start)
                    if nl < 0:
                        break
                    lineno = self.end_line + 1
                    end = base + nl + 1
                    items = parse(data[start:nl], base + start, end, lineno)
                    last = items[-1]
                    if len(items) > 1:
                        yield from items[:-1]
                    # Move past the line before handing out its last item (see the docstring).
                    self.end_line = lineno
                    self.end_offset = end
                    if type(last) is Event:
                        self.last_seq = last.seq
                    yield last
                    start = nl + 1
                pending = data[start:]
                base += start
            self.tail = "unfinished" if pending else "clean"

    def _parse(self, line: bytes, offset: int, end: int, lineno: int) -> list[Event | Problem]:
        """The items of one line (at least one): Problems, then at most one Event last."""
        out: list[Event | Problem] = []
        if b"\x00" in line:
            stripped = line.rstrip(b"\x00")
            after = line[line.rfind(b"\x00") + 1 :]
            holes = len(line) - len(line.replace(b"\x00", b""))
            out.append(
                Problem(
                    self.path,
                    lineno,
                    offset,
                    "nul_hole",
                    f"{holes} NUL bytes (a hole left by a crashed shared-filesystem client)",
                    stripped[:_RAW_LIMIT],
                )
            )
            if not after:
                return out
            offset = end - 1 - len(after)
            line = after
        if not checksum_ok(line):
            try:
                orjson.loads(line)
                reason = "checksum mismatch or missing"
                kind: ProblemKind = "checksum"
            except orjson.JSONDecodeError as exc:
                reason = f"not valid JSON ({str(exc).split(':', 1)[0]})"
                kind = "corrupt"
            out.append(Problem(self.path, lineno, offset, kind, reason, line[:_RAW_LIMIT]))
            return out
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            out.append(
                Problem(self.path, lineno, offset, "corrupt", "not valid JSON", line[:_RAW_LIMIT])
            )
            return out
        if not isinstance(rec, dict):
            out.append(
                Problem(
                    self.path, lineno, offset, "corrupt", "not a JSON object", line[:_RAW_LIMIT]
                )
            )
            return out
        version = rec.get("v")
        if version not in SUPPORTED_VERSIONS:
            out.append(
                Problem(
                    self.path,
                    lineno,
                    offset,
                    "version",
                    f"record format version {version!r} is not supported (reads "
                    f"{sorted(SUPPORTED_VERSIONS)}); upgrade formula-foundry",
                    line[:_RAW_LIMIT],
                )
            )
            return out
        seq, t, kind_name = rec.get("s"), rec.get("t"), rec.get("k")
        if (
            type(seq) is not int
            or type(t) is not int
            or not isinstance(kind_name, str)
            or kind_name not in KINDS
        ):
            out.append(
                Problem(
                    self.path,
                    lineno,
                    offset,
                    "corrupt",
                    "record lacks a valid envelope (integer s and t, known kind k)",
                    line[:_RAW_LIMIT],
                )
            )
            return out
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            out.append(
                Problem(
                    self.path,
                    lineno,
                    offset,
                    "sequence",
                    f"sequence jumps from {self.last_seq} to {seq} (records lost or reordered)",
                )
            )
        out.append(Event(seq, t, kind_name, rec, lineno, offset, end))
        return out


def iter_segment(path: Path, offset: int = 0) -> Iterator[Event | Problem]:
    """Convenience: iterate a whole segment (or from ``offset``) with a fresh reader."""
    return iter(SegmentReader(path, offset))
