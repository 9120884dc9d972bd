"""The captured console of each run, per process, as the sync keeps it between passes.

``console`` events (:mod:`formula_foundry.tracking.console_events`) are uploaded as one text
file per process (:mod:`formula_foundry.sync.engine.console_upload`). MLflow's artifact stores
cannot append, so the sync keeps, in ``<state folder>/console/``, what it needs to send the
next piece without reading the run's segments from the start again:

``live/<run>.json``   for each console-bearing segment of the run, the process it belongs to
                      (``<host>-<pid>`` from its header) and how far its console was read;
                      for each process, its bytes so far, the piece ends sealed, and which
                      pieces the destination run holds (with that run's id);
``copies/<run>/<process>.log``  the bytes of each process's console read so far;
``done/<run>.json``   the same record once the run has ended and its files are final (the
                      copies are removed then: the destination holds the whole files).

Everything here can be rebuilt from the spool: a copy shorter than its record (a crash of the
host, a removed folder) is read again from its segments. A record is only ever behind the
destination (what it says was sent was acknowledged first), so a crash costs a re-upload of
the same bytes under the same name, never a duplicate.

The replay notes each ``console`` event it passes (:func:`console_seen`): the first one of a
segment is recorded before the replay's progress moves past it, so a pass killed in between
still finds the segment next time; one read again from before where the record stands means
the whole run is being sent again (``--replay``, a destination that lost the run), and the
process's files are uploaded again too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from formula_foundry.substrate.atomic import atomic_write_bytes
from formula_foundry.sync.engine.scan import SegmentFile
from formula_foundry.tracking.console_events import console_item
from formula_foundry.tracking.events import K_CONSOLE
from formula_foundry.tracking.spool_reader import Event, SegmentReader, read_header

FOLDER: Final = "console"
_VERSION: Final = 1


def process_name(header: dict[str, Any] | None) -> str:
    """``<host>-<pid>`` of the process that wrote a segment, safe as an artifact file name."""
    header = header or {}
    host = "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_"
        for ch in str(header.get("host") or "host")
    ).strip(".")
    return f"{host[:64] or 'host'}-{header.get('pid', 0)}"


Position = tuple[int, int, int]  # byte offset, line, sequence number: a SegmentReader's start
START: Final[Position] = (0, 0, -1)


def read_console(
    path: Path, start: Position = START, stop: int | None = None
) -> tuple[list[bytes], Position]:
    """The console bytes of the segment's events from ``start`` to byte ``stop`` (the end of
    what is complete if ``None``), in spool order, and where the next read starts. Damaged
    lines and payloads are skipped: the replay quarantines them."""
    reader = SegmentReader(path, *start)
    out: list[bytes] = []
    pos = start
    for item in reader:
        if stop is not None and reader.end_offset > stop:
            break
        pos = (reader.end_offset, reader.end_line, reader.last_seq)
        if isinstance(item, Event) and item.kind == K_CONSOLE:
            got = console_item(item.data)
            if got is not None and got.data:
                out.append(got.data)
    else:
        pos = (reader.end_offset, reader.end_line, reader.last_seq)
    return out, pos


def process_bytes(segments: Iterable[SegmentFile]) -> Iterator[tuple[str, list[bytes]]]:
    """Each process's console, whole, from a run's segments (``verify``)."""
    by_proc: dict[str, list[bytes]] = {}
    for seg in sorted(segments, key=lambda s: s.order):
        chunks, _ = read_console(seg.path)
        if chunks:
            by_proc.setdefault(process_name(read_header(seg.path)), []).extend(chunks)
    yield from by_proc.items()


@dataclass
class Mark:
    """How far one segment's console was read into its process's copy."""

    proc: str
    pos: Position = START


@dataclass
class Proc:
    """One process's console: bytes read, sealed piece ends, what the destination holds."""

    size: int = 0
    ends: list[int] = field(default_factory=list)
    run: str = ""  # the destination run ``sent`` describes
    sent: list[tuple[int, int]] = field(default_factory=list)  # piece i: its byte range
    final: bool = False  # the run ended: one whole file from now on
    resend: bool = False  # the destination's files are not to be trusted: send all again
    # Not saved: this pass found its copy gone and its segments too (``ff-sync gc`` archived
    # the run's folder, then the run was resumed): nothing to rebuild it from, so what the
    # destination holds stays as it is.
    gone: bool = False


@dataclass
class RunConsole:
    """The record of one run (see the module docstring)."""

    folder: Path  # <state folder>/console
    spool_run_id: str
    segments: dict[str, Mark] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    done: bool = False
    synced: bool = False  # the destination held every planned piece at the last save

    @classmethod
    def load(cls, folder: Path, spool_run_id: str) -> RunConsole:
        rec = cls(folder, spool_run_id)
        for where, done in (("live", False), ("done", True)):
            try:
                raw = orjson.loads((folder / where / f"{spool_run_id}.json").read_bytes())
            except FileNotFoundError:
                continue
            except orjson.JSONDecodeError:
                break  # written atomically, so never torn: a record edited by hand starts afresh
            rec.segments = {
                rel: Mark(m["proc"], tuple(m["pos"])) for rel, m in raw["segments"].items()
            }
            rec.procs = {
                name: Proc(
                    p["size"],
                    list(p["ends"]),
                    p["run"],
                    [(s, e) for s, e in p["sent"]],
                    p["final"],
                    p["resend"],
                )
                for name, p in raw["procs"].items()
            }
            rec.done, rec.synced = done, bool(raw.get("synced"))
            break
        return rec

    def save(self) -> None:
        """Write the record durably, in ``live/`` or ``done/``, and remove the other one."""
        data = {
            "v": _VERSION,
            "synced": self.synced,
            "segments": {
                rel: {"proc": m.proc, "pos": list(m.pos)} for rel, m in self.segments.items()
            },
            "procs": {
                name: {
                    "size": p.size,
                    "ends": p.ends,
                    "run": p.run,
                    "sent": [list(r) for r in p.sent],
                    "final": p.final,
                    "resend": p.resend,
                }
                for name, p in self.procs.items()
            },
        }
        here, other = ("done", "live") if self.done else ("live", "done")
        (self.folder / here).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / here / f"{self.spool_run_id}.json", orjson.dumps(data))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / other / f"{self.spool_run_id}.json")

    # -- the copies -------------------------------------------------------------------------

    def copy_path(self, proc: str) -> Path:
        return self.folder / "copies" / self.spool_run_id / f"{proc}.log"

    def read_copy(self, proc: str, start: int, end: int) -> bytes:
        with open(self.copy_path(proc), "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    def catch_up(self, files: dict[str, SegmentFile], acknowledged: dict[str, int]) -> None:
        """Read each console segment up to where the replay's progress stands (``acknowledged``:
        byte offset by segment) into its process's copy; copies that do not match their
        record are first read again from the start — unless a segment of the process is no
        longer there (:attr:`Proc.gone`)."""
        for proc, p in self.procs.items():
            path = self.copy_path(proc)
            try:
                have = path.stat().st_size
            except FileNotFoundError:
                have = -1
            if have == p.size:
                continue
            if have > p.size:  # bytes appended after the last save: not counted yet
                os.truncate(path, p.size)
                continue
            if any(m.proc == proc and rel not in files for rel, m in self.segments.items()):
                p.gone = True  # read again, it would come out shorter than what was sent
                continue
            p.size, p.ends = 0, []
            for mark in self.segments.values():
                if mark.proc == proc:
                    mark.pos = START
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        order = sorted(
            (rel for rel in self.segments if rel in files), key=lambda rel: files[rel].order
        )
        for rel in order:
            mark, stop = self.segments[rel], acknowledged.get(rel, 0)
            if stop <= mark.pos[0]:
                continue
            chunks, mark.pos = read_console(files[rel].path, mark.pos, stop)
            p = self.procs.setdefault(mark.proc, Proc())
            path = self.copy_path(mark.proc)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    p.size += len(chunk)

    def behind(self, acknowledged: dict[str, int]) -> bool:
        """Whether the replay acknowledged console segments further than they were read."""
        return any(acknowledged.get(rel, 0) > m.pos[0] for rel, m in self.segments.items())

    def finish(self) -> None:
        """The run's files are final: keep the record in ``done/``, remove the copies."""
        self.done = True
        self.save()
        shutil.rmtree(self.folder / "copies" / self.spool_run_id, ignore_errors=True)


def live_runs(folder: Path) -> list[str]:
    """The runs whose console files are not final yet."""
    try:
        names = os.listdir(folder / "live")
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != ".")


# -- what the replay notes -------------------------------------------------------------------

_lock = threading.Lock()
_seen: dict[tuple[Path, str], RunConsole] = {}  # this pass's records (workers share them)


def console_seen(state_folder: Path, spool_run_id: str, seg: SegmentFile, ev: Event) -> None:
    """Note an event the replay passes without sending (only ``console`` ones count)."""
    if ev.kind != K_CONSOLE:
        return
    key = (state_folder, spool_run_id)
    with _lock:
        rec = _seen.get(key)
        if rec is None:
            rec = _seen[key] = RunConsole.load(state_folder / FOLDER, spool_run_id)
        mark = rec.segments.get(seg.rel)
        if mark is None:
            proc = process_name(read_header(seg.path))
            rec.segments[seg.rel] = Mark(proc)
            rec.procs.setdefault(proc, Proc())
        elif ev.offset < mark.pos[0]:  # read again: the whole run is being sent again
            if rec.procs[mark.proc].resend and not rec.done:
                return
            rec.procs[mark.proc].resend = True
        elif not rec.done:
            return
        # (a run whose files were final has new console bytes: it is live again)
        rec.done = rec.synced = False
        rec.save()  # before the replay's progress moves past this event


def forget_seen(state_folder: Path) -> None:
    """End of a pass: the records are read from their files again next time."""
    with _lock:
        for key in [k for k in _seen if k[0] == state_folder]:
            del _seen[key]
