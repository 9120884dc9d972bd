"""What one destination has acknowledged, and the quarantine report of records it never got.

Everything lives in ``<sync.state_dir>/<destination key>/``:

``state.sqlite3``     progress (stdlib ``sqlite3``, WAL): one row per segment — byte offset,
                      line and sequence number up to which every event is committed in the
                      destination, the file size last seen, and whether the segment is complete —
                      and one row per run — its id and experiment in the destination, the last
                      status synced, its parent, the time of its latest event (its last
                      sign of life, heartbeats included) — and the runs the sync itself ended
                      as KILLED because they went silent (``stale_ended``, see
                      :mod:`formula_foundry.sync.engine.stale`) — and, in ``meta``, the id of this
                      state folder and the generation the destination last confirmed
                      (:mod:`formula_foundry.sync.engine.destination_id`).
``destination.txt``   the destination's URI (password redacted), for humans.
``sync.lock``         held by the one ``ff-sync`` working on this destination.
``quarantine.jsonl``  one JSON object per record that could not be synced (see docs/sync.md).

Progress is written only after the destination committed what it covers, so the state is
never ahead of the destination; being behind only means re-sending idempotent writes.
``ff-sync --replay`` makes the next pass resend everything; so does deleting the folder (the
destination records which folder, ``host:path``, owns the spool: a folder recreated at the same
place takes its place again, any other folder is refused until ``--replay`` takes over).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from formula_foundry.errors import ConfigError

STATE_FILE: Final = "state.sqlite3"
LOCK_FILE: Final = "sync.lock"
QUARANTINE_FILE: Final = "quarantine.jsonl"
DESTINATION_FILE: Final = "destination.txt"
# 2: table meta (state id, destination generation); 3: table jobs (an older ff-sync would not
# keep it current, and a stale job id could end a run whose new job is running).
SCHEMA_VERSION: Final = 3
# The columns keep the names of the first schema, so state folders of earlier versions stay
# readable: run_uuid is the spool's run id (RunRecord.spool_run_id), run_id the destination's
# (mlflow_run_id), parent_uuid the parent's spool run id.
_RUN_COLUMNS: Final = (
    "run_uuid, run_id, experiment_id, status, parent_uuid, parent_linked, last_t, end_time"
)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS segments (
    rel         TEXT PRIMARY KEY,
    run_uuid    TEXT NOT NULL,
    byte_offset INTEGER NOT NULL,
    line        INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    size_seen   INTEGER NOT NULL,
    done        INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_run ON segments (run_uuid);
CREATE TABLE IF NOT EXISTS runs (
    run_uuid      TEXT PRIMARY KEY,
    run_id        TEXT NOT NULL,
    experiment_id TEXT NOT NULL,
    status        TEXT NOT NULL,
    parent_uuid   TEXT,
    parent_linked INTEGER NOT NULL,
    last_t        INTEGER NOT NULL,
    end_time      INTEGER,
    updated_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stale_ended (
    run_uuid    TEXT PRIMARY KEY,
    last_t      INTEGER NOT NULL,
    ended_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    run_uuid    TEXT PRIMARY KEY,
    job         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class SegmentProgress:
    """Where the next pass resumes in one segment (``last_seq`` -1: nothing read yet)."""

    rel: str
    spool_run_id: str
    offset: int = 0
    line: int = 0
    last_seq: int = -1
    size_seen: int = -1
    done: bool = False


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A spooled run as the destination knows it."""

    spool_run_id: str
    mlflow_run_id: str
    experiment_id: str
    status: str
    parent_spool_run_id: str | None = None
    parent_linked: bool = True
    last_t: int = 0
    end_time: int | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SyncState:
    """The progress database of one destination. Use only while holding its ``sync.lock``.

    Thread-safe: the parallel workers of a pass (:mod:`formula_foundry.sync.engine.parallel`) share
    one connection behind one lock. Each write is a single small statement committed at once,
    so the lock is held for microseconds; per-thread connections would only add WAL write
    contention and lose the single-transaction guarantees of :meth:`forget_run`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        # Reentrant: mark_stale_ended holds it across its transaction and calls save_run.
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"sync state {self.path} was written by a newer formula-foundry "
                    f"(schema {version}); upgrade, or use another sync.state_dir"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"sync state {self.path} is unreadable ({exc}); move it away to resend everything"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- identity (formula_foundry.sync.engine.destination_id) ------------------------------------

    def identity(self) -> tuple[str | None, int]:
        """This folder's id (``None`` until a pass claimed the destination) and the
        destination generation it last confirmed (0: none)."""
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        generation = meta.get("generation", "0")
        return meta.get("id"), int(generation) if generation.isdigit() else 0

    def set_identity(self, state_id: str, generation: int) -> None:
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("id", state_id), ("generation", str(generation))],
            )

    def has_progress(self) -> bool:
        """Whether anything was ever acknowledged (a segment or a run is recorded)."""
        with self._lock:
            return (
                self._db.execute(
                    "SELECT 1 FROM segments UNION ALL SELECT 1 FROM runs LIMIT 1"
                ).fetchone()
                is not None
            )

    # -- segments -------------------------------------------------------------------------

    def segments(self) -> dict[str, SegmentProgress]:
        with self._lock:
            rows = self._db.execute(
                "SELECT rel, run_uuid, byte_offset, line, last_seq, size_seen, done FROM segments"
            )
            return {
                r[0]: SegmentProgress(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows
            }

    def save_segment(self, p: SegmentProgress) -> None:
        """Record (and commit) progress in one segment."""
        with self._lock:
            self._db.execute(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rel) "
                "DO UPDATE SET "
                "run_uuid = excluded.run_uuid, byte_offset = excluded.byte_offset, "
                "line = excluded.line, last_seq = excluded.last_seq, "
                "size_seen = excluded.size_seen, done = excluded.done, "
                "updated_ms = excluded.updated_ms",
                (
                    p.rel,
                    p.spool_run_id,
                    p.offset,
                    p.line,
                    p.last_seq,
                    p.size_seen,
                    int(p.done),
                    _now_ms(),
                ),
            )

    # -- runs -----------------------------------------------------------------------------

    def run(self, spool_run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_uuid = ?",
                (spool_run_id,),
            ).fetchone()
            return None if row is None else _run_record(row)

    def save_run(self, r: RunRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.spool_run_id,
                    r.mlflow_run_id,
                    r.experiment_id,
                    r.status,
                    r.parent_spool_run_id,
                    int(r.parent_linked),
                    r.last_t,
                    r.end_time,
                    _now_ms(),
                ),
            )

    def mark_linked(self, spool_run_id: str) -> None:
        """Record that a run's parent link is set, touching nothing else of its row (a worker
        may be saving the run's status meanwhile)."""
        with self._lock:
            self._db.execute(
                "UPDATE runs SET parent_linked = 1, updated_ms = ? WHERE run_uuid = ?",
                (_now_ms(), spool_run_id),
            )

    def unlinked_children(self, parent_spool_run_id: str) -> list[RunRecord]:
        """Runs created before their parent could be found (see docs/sync.md)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE parent_uuid = ? AND parent_linked = 0",
                (parent_spool_run_id,),
            )
            return [_run_record(row) for row in rows]

    def live_runs(self) -> list[RunRecord]:
        """Runs whose last status synced is RUNNING (no end event synced)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = 'RUNNING'")
            return [_run_record(row) for row in rows]

    def ended_runs(self) -> list[RunRecord]:
        """Runs whose real end event is synced (runs the sync ended as stale excluded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.run_uuid, r.run_id, r.experiment_id, r.status, r.parent_uuid, "
                "r.parent_linked, r.last_t, r.end_time FROM runs r LEFT JOIN stale_ended s "
                "ON s.run_uuid = r.run_uuid AND s.last_t = r.last_t "
                "WHERE r.status IN ('FINISHED', 'FAILED', 'KILLED') AND s.run_uuid IS NULL"
            )
            return [_run_record(row) for row in rows]

    def mark_stale_ended(self, r: RunRecord) -> None:
        """Record that the sync ended ``r`` (KILLED at its last sign of life ``r.last_t``)."""
        with self._lock, self._transaction():
            self.save_run(r)
            self._db.execute(
                "INSERT OR REPLACE INTO stale_ended VALUES (?, ?, ?)",
                (r.spool_run_id, r.last_t, _now_ms()),
            )

    def is_stale_ended(self, spool_run_id: str, last_t: int) -> bool:
        """Whether the sync ended the run as dead at ``last_t`` (and nothing came since)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM stale_ended WHERE run_uuid = ? AND last_t = ?",
                (spool_run_id, last_t),
            ).fetchone()
            return row is not None

    def save_job(self, spool_run_id: str, job: str) -> None:
        """The batch job a run's latest ``run_start`` came from (``slurm:<id>``)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (spool_run_id, job))

    def jobs(self) -> dict[str, str]:
        """Run → batch job, for the runs whose start named one."""
        with self._lock:
            return dict(self._db.execute("SELECT run_uuid, job FROM jobs"))

    def forget_run(self, spool_run_id: str) -> None:
        """Drop a run's mapping and the progress of its segments: its events are resent."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM runs WHERE run_uuid = ?", (spool_run_id,))
            self._db.execute("DELETE FROM stale_ended WHERE run_uuid = ?", (spool_run_id,))
            self._db.execute("DELETE FROM segments WHERE run_uuid = ?", (spool_run_id,))
            self._db.execute("DELETE FROM jobs WHERE run_uuid = ?", (spool_run_id,))

    def reset(self) -> None:
        """Forget everything this destination acknowledged (``ff-sync --replay``)."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM runs")
            self._db.execute("DELETE FROM stale_ended")
            self._db.execute("DELETE FROM segments")
            self._db.execute("DELETE FROM jobs")

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


def prepare_folder(state_dir: Path, key: str, redacted_uri: str) -> Path:
    """Create ``<state_dir>/<key>/`` and its ``destination.txt``; return the folder."""
    folder = state_dir / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = f"{redacted_uri}\n"
        marker = folder / DESTINATION_FILE
        if not marker.is_file() or marker.read_text(encoding="utf-8") != text:
            tmp = folder / f".{DESTINATION_FILE}.{os.getpid()}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, marker)
    except OSError as exc:
        raise ConfigError(
            f"cannot use sync state folder {folder}: {exc.strerror or exc} "
            "(check sync.state_dir in config/mlflow.yaml)"
        ) from None
    return folder
