"""Helpers of the tracking tests: read what a run spooled, run Python in a child process."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from formula_foundry.tracking.spool_reader import Event, Problem, SegmentReader
from formula_foundry.tracking.spool_writer import segment_started_ms
from tests._proc import child_env, run_python

__all__ = ["child_env", "run_python"]  # the shared ones, for this package's tests


def segments(spool_root: Path, run_id: str) -> list[Path]:
    """The segment files of one run in the sync's merge order (name time, then name)."""
    found = (spool_root / run_id).glob("seg-*.jsonl")
    return sorted(found, key=lambda p: (segment_started_ms(p.name), p.name))


def only_segment(spool_root: Path, run_id: str) -> Path:
    found = segments(spool_root, run_id)
    assert len(found) == 1, found
    return found[0]


def read(path: Path, **state: int) -> tuple[list[Event], list[Problem], SegmentReader]:
    """Read a segment (from an optional offset/line/last_seq); split events and problems."""
    reader = SegmentReader(path, **state)
    events: list[Event] = []
    problems: list[Problem] = []
    for item in reader:
        (events if isinstance(item, Event) else problems).append(item)
    return events, problems, reader


def read_clean(path: Path) -> list[Event]:
    """Read a segment that must have no problem and a clean tail; return its events."""
    events, problems, reader = read(path)
    assert problems == [], [p.describe() for p in problems]
    assert reader.tail == "clean"
    assert [e.seq for e in events] == list(range(len(events)))
    return events


def payloads(events: list[Event], kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``events`` (of one kind) without the envelope keys v, s, t, c."""
    out = []
    for e in events:
        if kind is None or e.kind == kind:
            out.append({k: v for k, v in e.data.items() if k not in ("v", "s", "t", "c")})
    return out


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same_float(a: float, b: float) -> bool:
    """Bit-identical, except that every NaN equals every NaN (the spool spells NaN once)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return float_bits(a) == float_bits(b)


def run_child(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` (dedented) in a fresh interpreter in ``cwd``, its output as bytes, whatever
    its exit (the SIGTERM tests look at how it died)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        timeout=300,
    )


def start_child(code: str, cwd: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``code`` (dedented) in a fresh interpreter in ``cwd``, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
