"""The quarantine report of one destination: ``quarantine.jsonl`` in its state folder, one
JSON object per record that could not be synced, each ``(file, offset)`` once (docs/sync.md).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import orjson


class QuarantineLog:
    """Append-only JSON Lines report of quarantined records, one line per ``(file, offset)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[tuple[str, int]] | None = None
        self._dirty = False
        # Parallel workers share the log: one lock keeps lines whole and the dedup set right.
        self._lock = threading.Lock()

    def _load(self) -> set[tuple[str, int]]:
        seen: set[tuple[str, int]] = set()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return seen
        for raw in data.splitlines():
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash: the record will be reported again
            if isinstance(rec, dict):
                seen.add((str(rec.get("file")), int(rec.get("offset", -1))))
        return seen

    def add(self, record: dict[str, Any]) -> bool:
        """Append ``record`` unless its ``(file, offset)`` is already reported; True if new."""
        with self._lock:
            return self._add(record)

    def _add(self, record: dict[str, Any]) -> bool:
        if self._seen is None:
            self._seen = self._load()
        key = (str(record["file"]), int(record["offset"]))
        if key in self._seen:
            return False
        with open(self.path, "a+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            prefix = b""
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    prefix = b"\n"  # end a line a crash cut short
            fh.write(prefix + orjson.dumps(record) + b"\n")
        self._seen.add(key)
        self._dirty = True
        return True

    def sync(self) -> None:
        """Make appended reports durable (called before progress moves past them)."""
        with self._lock:
            if not self._dirty:
                return
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._dirty = False
