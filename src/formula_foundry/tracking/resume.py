"""Find what an existing run's spool says about it, to continue the run from a new process.

Used when a requeued job resumes a run (``start_run(run_id=...)`` or ``FF_RUN_ID``) and when a
worker attaches to a run started elsewhere. Off the hot path: it reads segment heads once, and
the params and artifact references the run already logged (so a resumed run refuses a changed
param at log time, as one process does) with one linear scan of its segments.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson

from formula_foundry.errors import FormulaFoundryError, RunStateError, ValidationError
from formula_foundry.ids import run_id_problem
from formula_foundry.tracking.events import K_ARTIFACT_REF, K_PARAMS, K_RUN_START, checksum_ok
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import is_segment_name, segment_started_ms

# run_start is the first event after the header; a few lines are enough to find it.
_HEAD_EVENTS = 8
_CHUNK: Final = 1 << 20
# Longer lines are skipped by the scan (a params event this big is far beyond any real use;
# the sync still sees it). Bounds the scan's memory whatever a damaged segment holds.
_MAX_SCANNED_LINE: Final = 16 << 20
# The envelope ``{"v":1,"s":<seq>,"t":<ms>,"k":"<kind>"`` fits well within this many bytes.
_KIND_WINDOW: Final = 96
_PARAMS_MARK: Final = b'"k":"%s"' % K_PARAMS.encode()
_REF_MARK: Final = b'"k":"%s"' % K_ARTIFACT_REF.encode()


@dataclass(frozen=True)
class RunOrigin:
    """The identity a run was started with: what a resumed segment must repeat."""

    run_id: str
    experiment: str
    run_name: str
    parent: str | None


def check_run_id(run_id: object) -> str:
    """A run id names a folder under the spool root (the rule: :mod:`formula_foundry.ids`)."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ValidationError(problem)
    return run_id  # type: ignore[return-value]


# FF_RUN_ID names one run: the process's first top-level run (tracker or MLflow drop-in) takes
# it. Inherited by a forked child, which must not take it again (that would silently merge its
# run into its parent's; a worker logs into it with attach_run).
_ff_run_id_taken: str | None = None
_ff_run_id_lock = threading.Lock()


def take_ff_run_id(value: str) -> str:
    """Take ``$FF_RUN_ID`` (``value``) for this process's top-level run; once per process."""
    global _ff_run_id_taken
    try:
        run_id = check_run_id(value)
    except ValidationError as exc:
        raise ValidationError(f"FF_RUN_ID: {exc}") from None
    with _ff_run_id_lock:
        if _ff_run_id_taken is not None:
            raise RunStateError(
                f"FF_RUN_ID={run_id} names one run, and this process (or the one it was forked "
                f"from) already started it; a second top-level run would merge into it. For a "
                "sweep, give each run its own id (tracker: run_id= in start_run) or unset "
                "FF_RUN_ID; a worker logs into the run with attach_run(os.environ['FF_RUN_ID'])"
            )
        _ff_run_id_taken = run_id
    return run_id


def give_back_ff_run_id() -> None:
    """The start that took ``$FF_RUN_ID`` failed: the next top-level run may take it."""
    global _ff_run_id_taken
    with _ff_run_id_lock:
        _ff_run_id_taken = None


def _after_fork_in_child() -> None:
    global _ff_run_id_lock
    _ff_run_id_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class Logged:
    """What a run's spool already holds that a new process of the run must respect."""

    params: dict[str, str] = field(default_factory=dict)
    artifact_paths: list[str] = field(default_factory=list)


def _segments(folder: Path) -> list[Path]:
    """The run's segments in the sync's merge order (name time, then name)."""
    return sorted(
        (p for p in folder.iterdir() if is_segment_name(p.name)),
        key=lambda p: (segment_started_ms(p.name), p.name),
    )


def read_logged(spool_root: Path, run_id: str) -> Logged:
    """The params (first value in merge order, as the sync keeps it) and artifact reference
    paths already spooled for ``run_id``.

    Only whole lines with a valid checksum count; unreadable segments are skipped (the sync
    reports them). Lines of other kinds are recognised by their envelope and never parsed,
    so the scan costs little more than reading the bytes.
    """
    logged = Logged()
    try:
        segments = _segments(spool_root / run_id)
    except OSError:
        return logged
    for path in segments:
        try:
            with open(path, "rb") as fh:
                _scan(fh.read, logged)
        except OSError:
            continue
    return logged


def _scan(read: Callable[[int], bytes], logged: Logged) -> None:
    # Only lines holding a kind's marker are looked at, found by bytes.find: a resumed run
    # with millions of metric lines starts in about the time it takes to read them.
    pending = b""
    while chunk := read(_CHUNK):
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n") + 1  # data[:cut] is whole lines
        for mark in (_PARAMS_MARK, _REF_MARK):
            pos = data.find(mark, 0, cut)
            while pos >= 0:
                start = data.rfind(b"\n", 0, pos) + 1
                end = data.find(b"\n", pos)
                if pos - start < _KIND_WINDOW:  # the envelope's kind, not text in a payload
                    _take(data[start:end], logged)
                pos = data.find(mark, end, cut)
        pending = data[cut:]
        if len(pending) > _MAX_SCANNED_LINE:
            pending = b""  # a damaged stretch without newlines: the checksum rejects its tail


def _take(line: bytes, logged: Logged) -> None:
    if not checksum_ok(line):
        return
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    if not isinstance(rec, dict):
        return
    if rec.get("k") == K_PARAMS and isinstance(rec.get("d"), dict):
        for key, value in rec["d"].items():
            if isinstance(value, str):
                logged.params.setdefault(key, value)
    elif rec.get("k") == K_ARTIFACT_REF and isinstance(rec.get("path"), str):
        logged.artifact_paths.append(rec["path"])


def find_origin(spool_root: Path, run_id: str) -> RunOrigin | None:
    """Return the original run_start of ``run_id`` under ``spool_root``, or None if unknown."""
    folder = spool_root / run_id
    if not folder.is_dir():
        return None
    for path in _segments(folder):
        try:
            reader = SegmentReader(path)
            for count, item in enumerate(reader):
                if count > _HEAD_EVENTS:
                    break
                if isinstance(item, Event) and item.kind == K_RUN_START:
                    data = item.data
                    if data.get("resume"):
                        break
                    return RunOrigin(
                        run_id,
                        str(data.get("experiment")),
                        str(data.get("name")),
                        data.get("parent") if isinstance(data.get("parent"), str) else None,
                    )
        except (OSError, FormulaFoundryError):
            continue
    return None
