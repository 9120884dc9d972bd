"""``ff-sync status``: how far each destination is behind the spools, from local files only.

For every run under the spool root, and in total, per destination: events synced, pending
and quarantined, when the run was last synced, its last sign of life, and whether it looks
dead (no end event, silent for ``sync.stale_after_s``). Everything comes from the spools and
the destination's state folder (``state.sqlite3``, opened read-only, and
``quarantine.jsonl``): the destination itself is never opened and MLflow never imported.

Counting is cheap: a segment whose size is the size the state last saw has nothing
pending, and its synced count is the recorded line number minus its header and its
quarantined lines; only the unread part of a grown segment is read, from the recorded
offset. Key names of :meth:`StatusReport.to_json` are documented in docs/operations.md.

With run ids (``ff-sync status RUN_ID...``) only those runs are counted, runs the spool no
longer holds (collected by ``ff-sync gc``) included, and each is mapped to what the sync state
recorded: the destination's run id and experiment id, hence the run's address in the MLflow UI
(:mod:`~formula_foundry.sync.commands.status_table`) and the filter that finds it in MLflow's
search.

What the sync cannot read is listed per run (``problems``), with its path and why: a run
folder or segment that cannot be read ("permission denied"), a symbolic link (never
followed). A segment whose header names another run counts nothing as pending: the pass
quarantines it whole.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from formula_foundry.config import Settings
from formula_foundry.errors import SpoolError
from formula_foundry.redact import redact_uri
from formula_foundry.sync.commands.status_table import run_url, search_filter, ui_of
from formula_foundry.sync.engine.destination import destination_key
from formula_foundry.sync.engine.destination_id import destination_problem
from formula_foundry.sync.engine.scan import (
    SegmentFile,
    Skipped,
    scan_spool_report,
    unreadable_reason,
)
from formula_foundry.sync.engine.sync_state import (
    DESTINATION_FILE,
    QUARANTINE_FILE,
    STATE_FILE,
    SegmentProgress,
)
from formula_foundry.tracking.events import (
    K_ARTIFACT,
    K_MODEL_ARTIFACT,
    K_RUN_END,
    K_RUN_START,
    K_SEGMENT,
)
from formula_foundry.tracking.spool_reader import Event, SegmentReader

JSON_VERSION: Final = 1
FILE_KINDS: Final = frozenset({K_ARTIFACT, K_MODEL_ARTIFACT})  # files of a run and of its models


@dataclass(frozen=True, slots=True)
class RunState:
    """The ``runs`` row of a run (what the destination last acknowledged)."""

    status: str
    last_t: int
    updated_ms: int
    stale_ended: bool
    mlflow_run_id: str  # in the destination
    experiment_id: str


class StateView:
    """Read-only view of one destination's state folder (never takes its lock)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.segments: dict[str, SegmentProgress] = {}
        self.segment_updated: dict[str, int] = {}
        self.runs: dict[str, RunState] = {}
        path = folder / STATE_FILE
        if path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            for r in db.execute(
                "SELECT rel, run_uuid, byte_offset, line, last_seq, size_seen, done, updated_ms "
                "FROM segments"
            ):
                self.segments[r[0]] = SegmentProgress(
                    r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])
                )
                self.segment_updated[r[0]] = r[7]
            for r in db.execute(
                "SELECT r.run_uuid, r.status, r.last_t, r.updated_ms, s.run_uuid IS NOT NULL, "
                "r.run_id, r.experiment_id FROM runs r LEFT JOIN stale_ended s "
                "ON s.run_uuid = r.run_uuid AND s.last_t = r.last_t"
            ):
                stale = bool(r[4]) and r[1] == "KILLED"
                self.runs[r[0]] = RunState(r[1], r[2], r[3], stale, r[5], r[6])
        except sqlite3.Error as exc:
            from formula_foundry.errors import SyncError

            raise SyncError(f"sync state {path} is unreadable: {exc}") from None
        finally:
            db.close()

    def quarantine(self) -> Iterator[dict[str, Any]]:
        """Every record of ``quarantine.jsonl`` (lines torn by a crash skipped)."""
        try:
            data = (self.folder / QUARANTINE_FILE).read_bytes()
        except FileNotFoundError:
            return
        for raw in data.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(raw)
                if isinstance(rec, dict):
                    yield rec


@dataclass
class RunStatus:
    """One run, as seen from one destination."""

    run: str
    status: str | None  # last status synced; None: the destination has not got the run yet
    events_synced: int = 0
    events_pending: int = 0
    events_quarantined: int = 0
    bytes_pending_upload: int = 0  # logged files of the run and its models not uploaded yet
    last_sync_ms: int | None = None
    last_event_ms: int | None = None
    ended: bool = False  # an end event is synced or pending after the last run_start
    ended_by_sync: bool = False  # KILLED by the sync because it went silent
    dead: bool = False
    problems: list[str] = field(default_factory=list)  # "<path>: <why it is not synced>"
    mlflow_run_id: str | None = None  # the destination's ids, as the sync state recorded them
    experiment_id: str | None = None
    ui_url: str | None = None  # the run's page in the MLflow UI

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "status": self.status,
            "mlflow_run_id": self.mlflow_run_id,
            "experiment_id": self.experiment_id,
            "ui_url": self.ui_url,
            "search_filter": search_filter(self.run),
            "events_synced": self.events_synced,
            "events_pending": self.events_pending,
            "events_quarantined": self.events_quarantined,
            "bytes_pending_upload": self.bytes_pending_upload,
            "last_sync_ms": self.last_sync_ms,
            "last_event_ms": self.last_event_ms,
            "dead": self.dead,
            "ended_by_sync": self.ended_by_sync,
            "problems": self.problems,
        }


@dataclass
class DestinationStatus:
    """Every run and the totals for one destination."""

    destination: str  # redacted
    key: str
    state_folder: Path
    configured: bool
    runs: list[RunStatus] = field(default_factory=list)
    # The destination is not the one the state describes (lost, replaced, older backup,
    # another owner): what the state calls synced may not be there. SQLite only.
    problem: str | None = None
    ui_command: str | None = None  # what serves its UI (databases: ``mlflow ui``)

    @property
    def last_sync_ms(self) -> int | None:
        times = [r.last_sync_ms for r in self.runs if r.last_sync_ms is not None]
        return max(times) if times else None

    def totals(self) -> dict[str, int]:
        return {
            "runs": len(self.runs),
            "events_synced": sum(r.events_synced for r in self.runs),
            "events_pending": sum(r.events_pending for r in self.runs),
            "events_quarantined": sum(r.events_quarantined for r in self.runs),
            "bytes_pending_upload": sum(r.bytes_pending_upload for r in self.runs),
            "runs_pending": sum(1 for r in self.runs if r.events_pending),
            "runs_dead": sum(1 for r in self.runs if r.dead),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "key": self.key,
            "state_folder": str(self.state_folder),
            "configured": self.configured,
            "problem": self.problem,
            "ui_command": self.ui_command,
            "last_sync_ms": self.last_sync_ms,
            "totals": self.totals(),
            "runs": [r.to_json() for r in self.runs],
        }


@dataclass
class StatusReport:
    """``ff-sync status`` for one or all destinations."""

    spool_root: Path
    stale_after_s: float
    generated_ms: int
    destinations: list[DestinationStatus]
    problems: list[str] = field(default_factory=list)  # the spool root itself cannot be read
    unknown_runs: list[str] = field(default_factory=list)  # asked for, found nowhere

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "generated_ms": self.generated_ms,
            "spool_root": str(self.spool_root),
            "stale_after_s": self.stale_after_s,
            "problems": self.problems,
            "unknown_runs": self.unknown_runs,
            "destinations": [d.to_json() for d in self.destinations],
        }


def sync_status(
    settings: Settings, *, all_destinations: bool = False, runs: Sequence[str] | None = None
) -> StatusReport:
    """The status of the configured destination (or of every one with a state folder); with
    ``runs``, of those runs only, in that order (``unknown_runs``: in no spool nor state)."""
    now_ms = time.time_ns() // 1_000_000
    scan = scan_spool_report(settings.spool_root)
    wanted = None if runs is None else list(dict.fromkeys(runs))
    if wanted is not None:
        keep = set(wanted)
        scan.segments = [s for s in scan.segments if s.spool_run_id in keep]
        scan.skipped = [s for s in scan.skipped if s.spool_run_id is None or s.spool_run_id in keep]
    configured = destination_key(settings.backend_store_uri)
    folders: dict[str, str] = {configured: redact_uri(settings.backend_store_uri)}
    if all_destinations:
        folders.update(_known_destinations(settings.sync_state_dir, configured))
    out = [
        _destination(
            settings.sync_state_dir / key,
            key,
            uri,
            key == configured,
            scan.segments,
            scan.skipped,
            now_ms,
            settings,
            wanted,
        )
        for key, uri in sorted(folders.items(), key=lambda kv: (kv[0] != configured, kv[0]))
    ]
    root_problems = [f"{s.path}: {s.reason}" for s in scan.skipped if s.spool_run_id is None]
    found = {r.run for d in out for r in d.runs}
    unknown = [r for r in wanted or [] if r not in found]
    return StatusReport(
        settings.spool_root, settings.stale_after_s, now_ms, out, root_problems, unknown
    )


def _known_destinations(state_dir: Path, configured: str) -> dict[str, str]:
    found: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(state_dir.iterdir()):
            if entry.name == configured or not (entry / STATE_FILE).is_file():
                continue
            try:
                uri = (entry / DESTINATION_FILE).read_text(encoding="utf-8").strip()
            except OSError:
                uri = f"(unknown destination, state folder {entry.name})"
            found[entry.name] = redact_uri(uri)  # written redacted; redact again anyway
    return found


def _destination(
    folder: Path,
    key: str,
    uri: str,
    configured: bool,
    segments: list[SegmentFile],
    skipped: list[Skipped],
    now_ms: int,
    settings: Settings,
    wanted: list[str] | None = None,
) -> DestinationStatus:
    view = StateView(folder)
    base, ui_command = ui_of(uri)
    quarantined: dict[str, set[tuple[str, int]]] = {}
    for rec in view.quarantine():
        quarantined.setdefault(str(rec.get("file")), set()).add(
            (str(rec.get("run")), _int(rec.get("line")))
        )
    runs: dict[str, RunStatus] = {}

    def run_status(spool_run_id: str) -> RunStatus:
        run = runs.get(spool_run_id)
        if run is None:
            known = view.runs.get(spool_run_id)
            run = RunStatus(spool_run_id, known.status if known else None)
            if known is not None:
                run.mlflow_run_id, run.experiment_id = known.mlflow_run_id, known.experiment_id
                run.ui_url = run_url(base, known.experiment_id, known.mlflow_run_id)
                run.last_sync_ms = known.updated_ms
                run.last_event_ms = known.last_t or None
                run.ended = known.status != "RUNNING"
                run.ended_by_sync = known.stale_ended
            runs[spool_run_id] = run
        return run

    for seg in segments:
        run = run_status(seg.spool_run_id)
        _count_segment(run, seg, view, quarantined.get(str(seg.path), set()))
    for skip in skipped:
        if skip.spool_run_id is not None:
            run_status(skip.spool_run_id).problems.append(f"{skip.path}: {skip.reason}")
    if wanted is not None:  # in the order asked; runs only the state knows (gc'd) included
        for spool_run_id in wanted:
            if spool_run_id in view.runs:
                run_status(spool_run_id)
        runs = {spool_run_id: runs[spool_run_id] for spool_run_id in wanted if spool_run_id in runs}
    limit_ms = now_ms - int(settings.stale_after_s * 1000)
    for run in runs.values():
        silent = run.last_event_ms is None or run.last_event_ms < limit_ms
        run.dead = run.ended_by_sync or (not run.ended and silent)
    real_uri = settings.backend_store_uri if configured else uri  # redacted only if a password
    problem = destination_problem(real_uri, folder, settings.spool_root)
    return DestinationStatus(uri, key, folder, configured, list(runs.values()), problem, ui_command)


def _count_segment(
    run: RunStatus, seg: SegmentFile, view: StateView, quarantined: set[tuple[str, int]]
) -> None:
    prog = view.segments.get(seg.rel)
    line = prog.line if prog is not None else 0
    lines_q = {n for r, n in quarantined if r == seg.spool_run_id}
    run.events_quarantined += len(lines_q)
    # Synced: every line up to the recorded position, except the header and what was set aside.
    run.events_synced += max(0, line - 1 - sum(1 for n in lines_q if 1 < n <= line))
    if prog is not None:
        updated = view.segment_updated.get(seg.rel)
        if updated is not None and (run.last_sync_ms is None or updated > run.last_sync_ms):
            run.last_sync_ms = updated
        if prog.size_seen == seg.size:
            return  # unchanged since the last pass: nothing pending, nothing to read
    _count_pending(run, seg, prog)


def _count_pending(run: RunStatus, seg: SegmentFile, prog: SegmentProgress | None) -> None:
    """Read the segment from the recorded position: complete events not synced yet."""
    reader = (
        SegmentReader(seg.path, prog.offset, prog.line, prog.last_seq)
        if prog is not None
        else SegmentReader(seg.path)
    )
    try:
        for item in reader:
            if (reader.header or {}).get("run") != seg.spool_run_id:
                return  # a copied segment: the pass quarantines it whole
            if not isinstance(item, Event) or item.kind == K_SEGMENT:
                continue
            run.events_pending += 1
            if run.last_event_ms is None or item.t > run.last_event_ms:
                run.last_event_ms = item.t
            if item.kind == K_RUN_END:
                run.ended = True
            elif item.kind in FILE_KINDS and type(size := item.data.get("size")) is int:
                run.bytes_pending_upload += max(size, 0)
            elif item.kind == K_RUN_START:
                run.ended = False
    except SpoolError:
        return  # the pass quarantines it; nothing here can be counted
    except OSError as exc:
        run.problems.append(f"{seg.path}: {unreadable_reason(exc)}")


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1
