"""Find the segments under a spool root: one ``os.scandir`` per folder, one ``stat`` per file.

Layout (see :mod:`formula_foundry.tracking.spool_writer`)::

    <spool_root>/<run_uuid>/seg-<start ms>-<host>-<pid>-<random>.jsonl

Scanning opens no file, so an idle pass costs a directory listing and a ``stat`` per segment.
Folders and files that do not follow the layout (hidden files, editor backups) are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from formula_foundry.tracking.spool_writer import is_segment_name, segment_started_ms


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment as found on disk. ``rel`` is ``<run_uuid>/<file name>``."""

    rel: str
    path: Path
    run_uuid: str
    started_ms: int
    size: int

    @property
    def order(self) -> tuple[int, str]:
        """Merge order of the segments of one run: name time (see ``spool_writer``), then name."""
        return (self.started_ms, self.rel)


def scan_spool(root: Path) -> list[SegmentFile]:
    """Every segment under ``root``, ordered by run, then merge order. No file is opened."""
    found: list[SegmentFile] = []
    try:
        runs = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for run in runs:
        if run.name.startswith(".") or not run.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(run.path))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we looked
        for entry in entries:
            name = entry.name
            if not is_segment_name(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (st.st_mode & 0o170000) != 0o100000:  # regular files only
                continue
            found.append(
                SegmentFile(
                    rel=f"{run.name}/{name}",
                    path=Path(entry.path),
                    run_uuid=run.name,
                    started_ms=segment_started_ms(name),
                    size=st.st_size,
                )
            )
    found.sort(key=lambda s: (s.run_uuid, s.started_ms, s.rel))
    return found
