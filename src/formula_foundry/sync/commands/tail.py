"""``ff-sync tail``: a run's console output, read from its spool on any host that sees it.

The bytes come from the run's ``console`` events (a run started with ``capture_output=True``:
docs/observability.md), segment by segment with :class:`SegmentReader` — every process of the
run writes a segment of its own — each process's in the order it spooled them, the processes
merged in time order. No MLflow, no sync state: read access to the spool is enough, so a login
node can follow a job while it runs.

Several processes: a line ``==> <host> pid <pid> <==`` goes before the bytes of each when the
process changes, as ``tail`` does between files. What the capture says about itself (the cap
was reached, bytes were dropped) and what cannot be read goes to ``note``, never among the
bytes.

``follow``: read what is new every ``poll_s`` seconds until the run has ended (its last
``run_start`` or ``run_end`` is a ``run_end``), then once more.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from formula_foundry.errors import RunStateError, SpoolError, ValidationError
from formula_foundry.ids import run_id_problem
from formula_foundry.sync.engine.scan import SegmentFile, scan_run
from formula_foundry.tracking.console_events import MERGED, ConsoleItem, console_item
from formula_foundry.tracking.events import K_CONSOLE, K_RUN_END, K_RUN_START
from formula_foundry.tracking.spool_reader import Event, SegmentReader

POLL_S: Final = 0.5
STREAM_CHOICES: Final = ("stdout", "stderr")


@dataclass
class _Segment:
    """Where reading one segment stopped, and whose it is."""

    order: tuple[int, str]
    offset: int = 0
    line: int = 0
    last_seq: int = -1
    size: int = -1  # the size at the last read: unchanged, nothing new
    source: str = ""  # "<host> pid <pid>", from the header
    broken: bool = False  # said once that it cannot be read


@dataclass
class _Chunk:
    t: int
    order: tuple[int, str]
    seq: int
    source: str
    item: ConsoleItem


@dataclass
class TailResult:
    """What :func:`tail_run` printed: bytes, and the processes they came from."""

    printed: int = 0
    sources: set[str] = field(default_factory=set)
    ended: bool = False
    captured: bool = False  # the spool holds console events (of any stream)


class _Tail:
    def __init__(
        self,
        folder: Path,
        spool_run_id: str,
        out: Callable[[bytes], None],
        note: Callable[[str], None],
        stream: str | None,
    ) -> None:
        self.root = folder.parent
        self.run_id = spool_run_id
        self.out = out
        self.note = note
        self.stream = stream
        self.segments: dict[str, _Segment] = {}
        self.last_life: tuple[tuple[int, str], int, str] | None = None  # newest start or end
        self.result = TailResult()
        self.current = ""  # the process whose bytes were printed last
        self.at_line_start = True
        self.merged_said: set[str] = set()

    def read_pass(self) -> None:
        """Print what every segment holds beyond where the last pass stopped."""
        chunks: list[_Chunk] = []
        for seg in scan_run(self.root, self.run_id):
            state = self.segments.setdefault(seg.rel, _Segment(seg.order))
            if state.size != seg.size and not state.broken:
                self._read(seg, state, chunks)
        by_source: dict[str, list[_Chunk]] = {}
        for c in sorted(chunks, key=lambda c: (c.order, c.seq)):
            by_source.setdefault(c.source, []).append(c)
        several = len(by_source.keys() | self.result.sources) > 1
        # Each process in spool order (its file in MLflow holds the same bytes: sync/engine/
        # console_upload.py), the processes merged by the time of each chunk's first byte.
        for chunk in heapq.merge(*by_source.values(), key=lambda c: c.t):
            self._print(chunk, several=several)
        life = self.last_life
        self.result.ended = life is not None and life[2] == K_RUN_END

    def _read(self, seg: SegmentFile, state: _Segment, chunks: list[_Chunk]) -> None:
        reader = SegmentReader(seg.path, state.offset, state.line, state.last_seq)
        damaged = 0
        try:
            for item in reader:
                if not isinstance(item, Event):
                    damaged += 1
                    continue
                if not state.source and reader.header is not None:
                    header = reader.header
                    state.source = f"{header.get('host', '?')} pid {header.get('pid', '?')}"
                kind = item.kind
                if kind == K_CONSOLE:
                    self.result.captured = True
                    got = console_item(item.data)
                    if got is None:
                        damaged += 1
                    elif self._wanted(got, state.source):
                        chunks.append(_Chunk(item.t, state.order, item.seq, state.source, got))
                elif kind in (K_RUN_START, K_RUN_END):
                    mark = (state.order, item.seq, kind)
                    if self.last_life is None or mark[:2] > self.last_life[:2]:
                        self.last_life = mark
        except (SpoolError, OSError) as exc:
            state.broken = True
            self.note(f"cannot read {seg.path}: {exc}")
            return
        state.offset, state.line, state.last_seq = (
            reader.end_offset,
            reader.end_line,
            reader.last_seq,
        )
        state.size = seg.size if reader.tail == "clean" else -1
        if damaged:
            self.note(f"{seg.path}: {damaged} damaged lines skipped")

    def _wanted(self, item: ConsoleItem, source: str) -> bool:
        if self.stream is None or item.stream == self.stream:
            return True
        if item.stream != MERGED:
            return False
        if source not in self.merged_said:
            self.merged_said.add(source)
            self.note(
                f"{source}: stdout and stderr went to one place and were captured as one "
                f"stream ({MERGED}): shown whole"
            )
        return True

    def _print(self, chunk: _Chunk, *, several: bool) -> None:
        item, source = chunk.item, chunk.source
        if item.limit is not None:
            self.note(
                f"{source}: the run's console reached its cap of {item.limit} bytes "
                "(tracking.console_max_bytes); what it printed after is not in the spool"
            )
            return
        if item.dropped is not None:
            self.note(f"{source}: {item.dropped} bytes of {item.stream} were not spooled")
            return
        if not item.data:
            return
        if several and source != self.current:
            self.out((b"" if self.at_line_start else b"\n") + f"==> {source} <==\n".encode())
        self.current = source
        self.out(item.data)
        self.at_line_start = item.data.endswith(b"\n")
        self.result.printed += len(item.data)
        self.result.sources.add(source)


def tail_run(
    spool_root: Path,
    spool_run_id: str,
    *,
    out: Callable[[bytes], None],
    note: Callable[[str], None],
    stream: str | None = None,
    follow: bool = False,
    poll_s: float = POLL_S,
) -> TailResult:
    """Print the console output of run ``spool_run_id`` (``stream`` alone, if given).

    ``out`` takes the bytes, ``note`` one-line remarks. Raises :class:`RunStateError` when the
    spool has no such run.
    """
    problem = run_id_problem(spool_run_id)
    if problem is not None:
        raise ValidationError(problem)
    if stream is not None and stream not in STREAM_CHOICES:
        raise ValidationError(f"stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")
    folder = spool_root / spool_run_id
    if not folder.is_dir():
        raise RunStateError(
            f"run {spool_run_id} has no spool under {spool_root} (check --spool-root, "
            "FF_SPOOL_ROOT or spool.root)"
        )
    tail = _Tail(folder, spool_run_id, out, note, stream)
    tail.read_pass()
    while follow and not tail.result.ended:
        time.sleep(poll_s)
        tail.read_pass()
    if follow:
        tail.read_pass()  # what the run's other processes wrote up to its end
    if not tail.result.captured and not follow:
        note(
            f"run {spool_run_id} has no console output in the spool (capture is off by "
            "default: start_run(capture_output=True), FF_CAPTURE_OUTPUT=1 or "
            "tracking.capture_output)"
        )
    return tail.result


def tail_to(
    stdout: BinaryIO,
    note: Callable[[str], None],
    spool_root: Path,
    spool_run_id: str,
    *,
    stream: str | None = None,
    follow: bool = False,
) -> TailResult | None:
    """:func:`tail_run` printing to ``stdout`` (``ff-sync tail``).

    Ctrl-C while following, or a reader that goes away (``ff-sync tail RUN | head``), ends it
    quietly: ``None``.
    """

    def out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    def remark(line: str) -> None:
        stdout.flush()  # the bytes before it first, where both go to one terminal
        note(line)

    try:
        return tail_run(
            spool_root, spool_run_id, out=out, note=remark, stream=stream, follow=follow
        )
    except KeyboardInterrupt:
        if not follow:
            raise
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stdout.fileno())  # no second error when Python flushes at exit
        finally:
            os.close(devnull)
    return None
