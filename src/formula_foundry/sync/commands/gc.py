"""``ff-sync gc``: archive or delete the spool folders of runs every destination has.

A run folder ``<spool_root>/<run id>/`` is collected only if, in **every** destination that
has a state folder under ``sync.state_dir`` (at least one):

* the run's own end event is synced (a run the sync ended as dead does not count: it may
  still be resumed);
* every segment of the folder is fully acknowledged: the acknowledged offset equals the
  file's size and its tail is clean (no torn last line waiting for more bytes);

and every segment's mtime is older than ``--older-than`` seconds, and the folder holds
nothing but segments. A SQLite destination that is not the one its state describes (file
deleted, an older backup restored, taken over by another state folder:
:func:`~formula_foundry.sync.engine.destination_id.destination_problem`) holds everything back:
its acknowledgements no longer mean the runs are there. The locks of all those destinations
are held meanwhile, so no pass runs at the same time.

The folder is first renamed to a hidden name in the spool root (scans skip it), checked
again — a segment that appeared or grew in between sends everything back — then moved to
``<archive>/<run id>/`` (default ``<spool_root>/../runs-archive``, keeping the spool layout:
``ff-sync --spool-root <archive>`` replays it) or deleted (``--delete``). ``--dry-run`` only
says what it would do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from formula_foundry.config import Settings
from formula_foundry.errors import SyncLocked
from formula_foundry.ids import is_run_id
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.destination_id import destination_problem
from formula_foundry.sync.engine.scan import SegmentFile, scan_spool
from formula_foundry.sync.engine.sync_state import (
    DESTINATION_FILE,
    LOCK_FILE,
    STATE_FILE,
    SyncState,
)
from formula_foundry.tracking.spool_writer import is_segment_name

LogFn = Callable[[str], None]
ARCHIVE_DIR_NAME = "runs-archive"


def default_archive(settings: Settings) -> Path:
    """``<spool_root>/../runs-archive``."""
    return settings.spool_root.parent / ARCHIVE_DIR_NAME


@dataclass
class GcReport:
    """What a gc did (or, with ``dry_run``, would do)."""

    collected: list[str] = field(default_factory=list)
    kept: int = 0
    destinations: int = 0

    def summary(self, action: str, dry_run: bool) -> str:
        verb = f"would {action}" if dry_run else f"{action}d" if action.endswith("e") else action
        return (
            f"ff-sync gc: {verb} {len(self.collected)} run folder"
            f"{'s' if len(self.collected) != 1 else ''}, kept {self.kept}, "
            f"{self.destinations} destination{'s' if self.destinations != 1 else ''} checked"
        )


def destination_folders(state_dir: Path) -> list[Path]:
    """Every destination state folder under ``state_dir`` (one with a state database)."""
    try:
        entries = sorted(state_dir.iterdir())
    except FileNotFoundError:
        return []
    return [d for d in entries if d.is_dir() and (d / STATE_FILE).is_file()]


@contextlib.contextmanager
def _locked(folders: list[Path], timeout_s: float) -> Iterator[None]:
    import filelock

    held: list[filelock.FileLock] = []
    try:
        for folder in folders:
            lock = filelock.FileLock(str(folder / LOCK_FILE))
            try:
                lock.acquire(timeout=timeout_s)
            except filelock.Timeout:
                raise SyncLocked(
                    f"an ff-sync holds {folder / LOCK_FILE} (still after {timeout_s:g} s); "
                    "try gc again later"
                ) from None
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _fully_acked(folders: list[Path]) -> tuple[dict[Path, set[str]], dict[str, int]]:
    """Per destination, the runs whose end it has synced; per segment, the size all of them
    acknowledged cleanly (absent if they disagree or one lacks it)."""
    ended_in: dict[Path, set[str]] = {}
    acked: dict[str, int] | None = None
    for folder in folders:
        state = SyncState(folder)
        try:
            ended = {r.spool_run_id for r in state.ended_runs()}
            here = {
                rel: p.offset
                for rel, p in state.segments().items()
                if p.offset == p.size_seen and p.offset >= 0
            }
        finally:
            state.close()
        ended_in[folder] = ended
        if acked is None:
            acked = here
        else:
            acked = {rel: off for rel, off in acked.items() if here.get(rel) == off}
    return ended_in, acked or {}


def _lagging(ended_in: dict[Path, set[str]], present: set[str]) -> list[tuple[Path, int]]:
    """Destinations that hold back runs the other destinations have all ended.

    A state folder left by a destination no longer used (a one-off ``--tracking-uri``, the
    SQLite file before a migration) would otherwise keep every new run forever, silently.
    """
    if len(ended_in) < 2:
        return []
    ended_somewhere = set().union(*ended_in.values()) & present
    return [
        (folder, len(ended_somewhere - ended))
        for folder, ended in ended_in.items()
        if ended_somewhere - ended
    ]


def _describe(folder: Path) -> str:
    try:
        # Redacted again: a file written by an older release may hold a password.
        text = (folder / DESTINATION_FILE).read_text(encoding="utf-8").strip()
        return redact_uri(text) or folder.name
    except OSError:
        return folder.name


def _snapshot(run_dir: Path) -> dict[str, tuple[int, float]] | None:
    """name -> (size, mtime) of the folder's files; None if it holds anything but segments."""
    out: dict[str, tuple[int, float]] = {}
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return None
    for entry in entries:
        if not is_segment_name(entry.name) or not entry.is_file(follow_symlinks=False):
            return None
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_size, st.st_mtime)
    return out


def collect_garbage(
    settings: Settings,
    older_than_s: float,
    *,
    archive: Path | None = None,
    delete: bool = False,
    dry_run: bool = False,
    log: LogFn = lambda _: None,
    now_s: float | None = None,
) -> GcReport:
    """Archive (default) or delete the run folders every destination has (module docstring)."""
    report = GcReport()
    folders = destination_folders(settings.sync_state_dir)
    report.destinations = len(folders)
    target = None if delete else (archive or default_archive(settings)).absolute()
    cutoff = (time.time() if now_s is None else now_s) - older_than_s
    by_run: dict[str, list[SegmentFile]] = {}
    for seg in scan_spool(settings.spool_root):
        by_run.setdefault(seg.spool_run_id, []).append(seg)
    if not folders:
        report.kept = len(by_run)
        return report
    with _locked(folders, settings.sync_lock_timeout_s):
        problems = [
            (folder, problem)
            for folder in folders
            if (problem := destination_problem(_describe(folder), folder, settings.spool_root))
        ]
        for folder, problem in problems:
            log(
                f"ff-sync gc: {_describe(folder)}: {problem}; nothing collected until a pass "
                f"resends it (or, if it is no longer used, move {folder} out of "
                f"{settings.sync_state_dir})"
            )
        if problems:
            report.kept = len(by_run)
            return report
        ended_in, acked = _fully_acked(folders)
        ended = set.intersection(*ended_in.values())
        for folder, count in _lagging(ended_in, set(by_run)):
            log(
                f"ff-sync gc: {_describe(folder)} has not synced the end of {count} run"
                f"{'s' if count != 1 else ''} other destinations have; if it is no longer "
                f"used, move {folder} out of {settings.sync_state_dir}"
            )
        for spool_run_id in sorted(by_run):
            run_dir = settings.spool_root / spool_run_id
            files = _snapshot(run_dir) if is_run_id(spool_run_id) else None
            if (
                spool_run_id not in ended
                or not files
                or any(
                    acked.get(f"{spool_run_id}/{name}") != size or mtime > cutoff
                    for name, (size, mtime) in files.items()
                )
            ):
                report.kept += 1
                continue
            where = "delete" if target is None else f"archive to {target / spool_run_id}"
            if dry_run:
                log(f"ff-sync gc: would {where}: {run_dir}")
                report.collected.append(spool_run_id)
                continue
            if _collect(run_dir, files, target):
                log(f"ff-sync gc: {where}: {run_dir}")
                report.collected.append(spool_run_id)
            else:
                report.kept += 1
    return report


def _collect(run_dir: Path, files: dict[str, tuple[int, float]], target: Path | None) -> bool:
    """Move the checked folder aside, check it again, then archive or delete it."""
    hidden = run_dir.with_name(f".gc-{run_dir.name}-{os.getpid()}")
    try:
        os.rename(run_dir, hidden)
    except OSError:
        return False
    now = _snapshot(hidden)
    if now is None or {k: v[0] for k, v in now.items()} != {k: v[0] for k, v in files.items()}:
        _put_back(hidden, run_dir)  # a writer came back meanwhile: leave the run alone
        return False
    if target is None:
        shutil.rmtree(hidden)
        return True
    dest = target / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
        shutil.move(str(hidden / name), str(dest / name))
    _fsync_dir(dest)
    hidden.rmdir()
    return True


def _put_back(hidden: Path, run_dir: Path) -> None:
    try:
        os.rename(hidden, run_dir)
        return
    except OSError:
        pass  # a writer recreated the folder: move our files back into it
    run_dir.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(hidden):
        os.replace(entry.path, run_dir / entry.name)
    hidden.rmdir()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
