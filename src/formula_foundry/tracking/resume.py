"""Find what an existing run's spool says about it, to continue the run from a new process.

Used when a requeued job resumes a run (``start_run(run_id=...)`` or ``FF_RUN_ID``) and when a
worker attaches to a run started elsewhere. Off the hot path: it reads segment heads once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from formula_foundry.errors import FormulaFoundryError, ValidationError
from formula_foundry.tracking.events import K_RUN_START
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import is_segment_name, segment_started_ms

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# run_start is the first event after the header; a few lines are enough to find it.
_HEAD_EVENTS = 8


@dataclass(frozen=True)
class RunOrigin:
    """The identity a run was started with: what a resumed segment must repeat."""

    run_id: str
    experiment: str
    run_name: str
    parent: str | None


def check_run_id(run_id: object) -> str:
    """A run id names a folder under the spool root: letters, digits, ``_ . -``, ≤ 128."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValidationError(
            f"run id {run_id!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return run_id


def find_origin(spool_root: Path, run_id: str) -> RunOrigin | None:
    """Return the original run_start of ``run_id`` under ``spool_root``, or None if unknown."""
    folder = spool_root / run_id
    if not folder.is_dir():
        return None
    segments = sorted(
        (p for p in folder.iterdir() if is_segment_name(p.name)),
        key=lambda p: (segment_started_ms(p.name), p.name),
    )
    for path in segments:
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
