"""Console events: captured bytes cut into spool events, the cap per run, reading them back.

A process whose output a run captures (:mod:`formula_foundry.tracking.console`) writes its
bytes into the run's spool as ``console`` events (docs/spool-format.md), each one of::

    {"stream": "stdout", "text": "<the bytes, valid UTF-8>"}
    {"stream": "stdout", "b64": "<the bytes, base64>"}      bytes that are not UTF-8
    {"stream": "stdout", "limit": <cap>}                     the cap was reached here
    {"stream": "stdout", "dropped": <n>}                     at the end: n bytes not spooled

``stream`` is ``stdout``, ``stderr``, or ``stdout+stderr`` where the two went to one place
(a terminal, one output file) and were captured together, in the order they were written.

An event holds at most :data:`CHUNK_BYTES` bytes of one stream, cut where no UTF-8 character is
split, so a reader can print each as it comes. The segment header says which host and process
wrote them. :class:`Chunker` is the writing side, :func:`console_item` the reading side
(``ff-sync tail``): one home for the format.
"""

from __future__ import annotations

import binascii
from typing import Any, Final, NamedTuple

import orjson

from formula_foundry.tracking.events import FORMAT_VERSION, K_CONSOLE

# stdout and stderr captured as one stream: they went to the same place.
MERGED: Final = "stdout+stderr"
STREAMS: Final = ("stdout", "stderr", MERGED)
# The most bytes one event holds (what one read of a busy printer brings, at most). Larger
# events cost the reader thread fewer JSON encodings, checksums and hand-overs of the GIL
# (tools/bench/bench_console.py); a reader still prints each one as it comes.
CHUNK_BYTES: Final = 1 << 20


def _lead_length(byte: int) -> int:
    """How many bytes the UTF-8 sequence that ``byte`` starts has (0: not a lead byte)."""
    if byte < 0x80:
        return 1
    if 0xC0 <= byte < 0xE0:
        return 2
    if 0xE0 <= byte < 0xF0:
        return 3
    if 0xF0 <= byte < 0xF8:
        return 4
    return 0


def utf8_cut(data: bytes | bytearray, limit: int, start: int = 0) -> int:
    """The largest ``n <= start + limit`` (and ``>= start``) at which ``data[start:n]`` ends
    no UTF-8 character half-way.

    Bytes that are not UTF-8 have no such point near the limit: they are cut at the limit.
    """
    end = start + limit
    if end >= len(data):
        return len(data)
    for n in range(end, max(end - 3, start) - 1, -1):
        if not 0x80 <= data[n] < 0xC0:  # a character starts at data[n]
            return n
    return end


def unfinished_tail(data: bytes | bytearray) -> int:
    """How many bytes at the end of ``data`` begin a UTF-8 character not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        length = _lead_length(data[-back])
        if length:
            return back if length > back else 0
    return 0


class _Pending:
    """One stream's bytes not taken yet: the reads as they came (joined when taken, which
    copies nothing when there is one: a busy printer's read is usually a chunk or more)."""

    __slots__ = ("dropped", "first_t", "pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.first_t = 0  # time of its first byte, in ms
        self.dropped = 0


class Chunker:
    """The bytes one capture has read and not spooled yet, and the cap they count against.

    :meth:`add` what was read; :meth:`take` the records to spool now (``final`` at the end:
    everything, and what was dropped). Not thread-safe: the capture's reader thread alone
    uses it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spooled = 0  # bytes in records taken so far
        self.capped = False
        self._pending: dict[str, _Pending] = {}  # by stream, in the order they first wrote

    def add(self, stream: str, data: bytes, t: int) -> None:
        p = self._pending.get(stream)
        if p is None:
            p = self._pending[stream] = _Pending()
        if self.capped:
            p.dropped += len(data)
            return
        if not p.size:
            p.first_t = t
        p.pieces.append(data)
        p.size += len(data)

    def largest(self) -> int:
        """The most bytes one stream has pending."""
        return max((p.size for p in self._pending.values()), default=0)

    def oldest_ms(self) -> int | None:
        """The time of the oldest byte not taken yet (None: nothing pending)."""
        times = [p.first_t for p in self._pending.values() if p.size]
        return min(times) if times else None

    def drop(self, stream: str, n: int) -> None:
        """Count ``n`` bytes of ``stream`` that were taken but could not be spooled."""
        if n:
            self._pending[stream].dropped += n

    def take(self, t: int, *, final: bool = False) -> list[tuple[dict[str, Any], str, int]]:
        """``(record, stream, bytes)`` of each event to spool now, in order; ``t`` is now.

        Not ``final``: a character whose last bytes have not arrived yet stays pending.
        ``final``: everything, then a ``dropped`` event for each stream that lost bytes.
        """
        out: list[tuple[dict[str, Any], str, int]] = []
        # Oldest first: spool order is then time order, which ff-sync tail and the console
        # files in MLflow both follow.
        for stream, p in sorted(self._pending.items(), key=lambda item: item[1].first_t):
            if p.size:
                data = b"".join(p.pieces)
                n = len(data) - (0 if final else unfinished_tail(data))
                room = 0 if self.capped else self.max_bytes - self.spooled
                reached = n > room
                if reached:
                    cut = utf8_cut(data, room)
                    p.dropped += len(data) - cut
                    n = len(data)  # all of it leaves the buffer; what is past the cut is lost
                    end_spooled = cut
                else:
                    end_spooled = n
                view = memoryview(data)
                start = 0
                while start < end_spooled:
                    end = min(utf8_cut(data, CHUNK_BYTES, start), end_spooled)
                    record = chunk_record(stream, view[start:end], p.first_t)
                    out.append((record, stream, end - start))
                    start = end
                view.release()
                p.pieces = [data[n:]] if n < len(data) else []
                p.size = len(data) - n
                self.spooled += end_spooled
                p.first_t = t
                if reached and not self.capped:
                    self.capped = True
                    out.append((_record(stream, t, limit=self.max_bytes), stream, 0))
            if final and p.dropped:
                out.append((_record(stream, t, dropped=p.dropped), stream, 0))
                p.dropped = 0
        return out


def _record(stream: str, t: int, **payload: Any) -> dict[str, Any]:
    return {"v": FORMAT_VERSION, "s": 0, "t": t, "k": K_CONSOLE, "stream": stream, **payload}


def chunk_record(stream: str, data: bytes | memoryview, t: int) -> dict[str, Any]:
    """The event of ``data`` read from ``stream``: its text, or base64 if not UTF-8."""
    try:
        return _record(stream, t, text=str(data, "utf-8"))
    except UnicodeDecodeError:
        return _record(stream, t, b64=_b64(data))


# A console record's bytes up to its last value, its sequence number left as %d: what
# events.frame() writes for it (orjson keeps the keys in insertion order, without spaces).
_SPLIT_HEAD: Final = b'{"v":%d,"s":%%d,"t":%d,"k":"%s","stream":"%s","%s":'


def split_record(record: dict[str, Any]) -> tuple[bytes, bytes]:
    """A record of :func:`chunk_record` or :class:`Chunker` as ``(head, body)`` for
    :meth:`~formula_foundry.tracking.spool_writer.SegmentWriter.append_split`: ``head % seq +
    body`` is what :func:`~formula_foundry.tracking.events.frame` would checksum.

    Why: the reader thread holds the GIL the printing thread wants while it frames. Framing
    the dict copies each chunk four times (JSON, the cut brace, the checksum's tail, the
    join); this way the chunk's JSON is made once and written where it lies.
    """
    *_, (key, value) = record.items()  # the payload: text, b64, limit or dropped, always last
    head = _SPLIT_HEAD % (
        record["v"],
        record["t"],
        K_CONSOLE.encode(),
        record["stream"].encode(),
        key.encode(),
    )
    return head, orjson.dumps(value)


def _b64(data: bytes | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class ConsoleItem(NamedTuple):
    """One console event read back: ``data`` (bytes of ``stream``), or a note about it."""

    stream: str
    data: bytes = b""
    limit: int | None = None  # the cap was reached at this point
    dropped: int | None = None  # bytes that were not spooled


def console_item(event: dict[str, Any]) -> ConsoleItem | None:
    """Read a ``console`` event's payload; ``None`` if it is not one this release wrote."""
    stream = event.get("stream")
    if stream not in STREAMS:
        return None
    text, b64 = event.get("text"), event.get("b64")
    if type(text) is str:
        return ConsoleItem(stream, text.encode("utf-8", "surrogatepass"))
    if type(b64) is str:
        try:
            data = binascii.a2b_base64(b64)
        except binascii.Error:
            return None
        # a2b_base64 skips what is not base64: only the writer's own spelling is taken.
        return ConsoleItem(stream, data) if _b64(data) == b64 else None
    limit, dropped = event.get("limit"), event.get("dropped")
    if type(limit) is int and limit >= 0:
        return ConsoleItem(stream, limit=limit)
    if type(dropped) is int and dropped >= 0:
        return ConsoleItem(stream, dropped=dropped)
    return None
