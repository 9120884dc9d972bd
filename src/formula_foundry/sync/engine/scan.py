"""Find the segments under a spool root: one ``os.scandir`` per folder, one ``stat`` per file.

Layout (see :mod:`formula_foundry.tracking.spool_writer`)::

    <spool_root>/<run id>/seg-<start ms>-<host>-<pid>-<random>.jsonl

Scanning opens no file, so an idle pass costs a directory listing and a ``stat`` per segment.
Folders and files that do not follow the layout (hidden files, editor backups) are ignored.

What cannot be scanned never stops the scan: a run folder that cannot be listed (permission
denied), a run folder or segment that is a symbolic link (never followed: the spool holds
its runs' own files, a link could point anywhere), a segment name that is no regular file.
:func:`scan_spool_report` returns each of them as a :class:`Skipped` path, so the sync,
``status`` and ``verify`` can name it; everything else is scanned as usual. A segment that
cannot be *opened* is only found when it is read (the scan opens nothing): readers report it
with :func:`unreadable_reason`.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from formula_foundry.tracking.spool_writer import is_segment_name, segment_started_ms

SkipKind = Literal["unreadable", "symlink", "not_regular"]
NOT_FOLLOWED: Final = "is a symbolic link; not synced"
NOT_REGULAR: Final = "is not a regular file; not synced"


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment as found on disk. ``rel`` is ``<run id>/<file name>``."""

    rel: str
    path: Path
    spool_run_id: str
    started_ms: int
    size: int

    @property
    def order(self) -> tuple[int, str]:
        """Merge order of the segments of one run: name time (see ``spool_writer``), then name."""
        return (self.started_ms, self.rel)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path under the spool root that is not synced, and why.

    ``spool_run_id`` is the run folder's name (``None``: the spool root itself).
    """

    spool_run_id: str | None
    path: Path
    kind: SkipKind
    reason: str

    def describe(self) -> str:
        where = f"run {self.spool_run_id}: " if self.spool_run_id is not None else "spool root "
        return f"{where}{self.path}: {self.reason}"


@dataclass
class SpoolScan:
    """What :func:`scan_spool_report` found: the segments, and the paths it had to skip."""

    segments: list[SegmentFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def skipped_runs(self) -> set[str]:
        """Runs with a part that could not be scanned (not to be judged dead, nor collected)."""
        return {s.spool_run_id for s in self.skipped if s.spool_run_id is not None}


def unreadable_reason(exc: OSError) -> str:
    """How a path that cannot be read is reported: ``permission denied``, or the OS's words."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()


def scan_spool(root: Path) -> list[SegmentFile]:
    """Every segment under ``root``, ordered by run, then merge order. No file is opened.

    Paths that cannot be scanned are left out silently; :func:`scan_spool_report` names them.
    """
    return scan_spool_report(root).segments


def scan_spool_report(root: Path) -> SpoolScan:
    """Every segment under ``root`` (as :func:`scan_spool`) and every path it had to skip."""
    out = SpoolScan()
    try:
        runs = list(os.scandir(root))
    except FileNotFoundError:
        return out
    except OSError as exc:
        reason = "is not a directory" if isinstance(exc, NotADirectoryError) else None
        out.skipped.append(Skipped(None, root, "unreadable", reason or unreadable_reason(exc)))
        return out
    for run in runs:
        if run.name.startswith("."):
            continue
        if run.is_symlink():
            out.skipped.append(Skipped(run.name, Path(run.path), "symlink", NOT_FOLLOWED))
            continue
        if not run.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(run.path))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we looked
        except OSError as exc:
            out.skipped.append(
                Skipped(run.name, Path(run.path), "unreadable", unreadable_reason(exc))
            )
            continue
        _scan_run(run.name, entries, out)
    out.segments.sort(key=lambda s: (s.spool_run_id, s.started_ms, s.rel))
    return out


def scan_run(root: Path, spool_run_id: str) -> list[SegmentFile]:
    """The segments of one run folder, in merge order (none if the folder is missing)."""
    out = SpoolScan()
    try:
        entries = list(os.scandir(root / spool_run_id))
    except (FileNotFoundError, NotADirectoryError):
        return []
    _scan_run(spool_run_id, entries, out)
    return sorted(out.segments, key=lambda s: s.order)


def _scan_run(spool_run_id: str, entries: list[os.DirEntry[str]], out: SpoolScan) -> None:
    for entry in entries:
        name = entry.name
        if not is_segment_name(name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:  # a folder that can be listed but not searched (mode r--)
            out.skipped.append(
                Skipped(spool_run_id, Path(entry.path), "unreadable", unreadable_reason(exc))
            )
            continue
        if not stat.S_ISREG(st.st_mode):
            kind: SkipKind = "symlink" if stat.S_ISLNK(st.st_mode) else "not_regular"
            reason = NOT_FOLLOWED if kind == "symlink" else NOT_REGULAR
            out.skipped.append(Skipped(spool_run_id, Path(entry.path), kind, reason))
            continue
        out.segments.append(
            SegmentFile(
                rel=f"{spool_run_id}/{name}",
                path=Path(entry.path),
                spool_run_id=spool_run_id,
                started_ms=segment_started_ms(name),
                size=st.st_size,
            )
        )
