"""Check event payloads before they go anywhere near the destination.

The tracker validates everything at log time, and every line carries a checksum; still, a
segment is input from another machine, written by another version, possibly edited by hand.
A payload MLflow would refuse would make it refuse the whole batch (and block its run), so
each record is checked here with the tracker's own rules; one that fails is quarantined as
``invalid`` and the rest of the run goes on. Keys are checked once per pass.
"""

from __future__ import annotations

import re
from typing import Final

from formula_foundry.errors import ValidationError
from formula_foundry.substrate.errors import InvalidLogicalPath
from formula_foundry.substrate.logical_path import validate_logical_path
from formula_foundry.sync.sink import ArtifactRef, MetricRow
from formula_foundry.tracking.events import INT64_MAX, INT64_MIN, check_key, decode_metric_value
from formula_foundry.tracking.spool_reader import Event

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")


class InvalidRecord(Exception):
    """A record whose payload breaks the format (its message says how): it is quarantined."""


def conflict_reason(key: str, old: str, new: str) -> str:
    """The quarantine reason of a param that already has another value."""
    return (
        f"param {key!r} is already {old!r}; this record sets {new!r} "
        "(params are write-once: the first value synced stays)"
    )


class PayloadChecker:
    """Turns event payloads into what a sink takes, or raises :class:`InvalidRecord`."""

    def __init__(self) -> None:
        self.keys_ok: set[str] = set()  # keys that passed MLflow's rules in this pass

    def key(self, key: object) -> None:
        if key in self.keys_ok:
            return
        try:
            self.keys_ok.add(check_key(key, "key", "(sync)"))
        except ValidationError as exc:
            raise InvalidRecord(str(exc).replace("run (sync): ", "")) from None

    def metric_rows(self, ev: Event) -> list[MetricRow]:
        """``(key, value, timestamp, step)`` of each point of a ``metrics`` event."""
        data = ev.data
        d, step, t = data.get("d"), data.get("step", 0), ev.t
        if type(d) is not dict or not d:
            raise InvalidRecord("metrics payload 'd' must be a non-empty object")
        if type(step) is not int or not INT64_MIN <= step <= INT64_MAX or t < 0:
            raise InvalidRecord(f"metric step {step!r} or timestamp {t!r} is out of range")
        rows: list[MetricRow] = []
        keys_ok = self.keys_ok
        for key, value in d.items():
            if key not in keys_ok:
                self.key(key)
            if type(value) is not float:
                try:
                    value = decode_metric_value(value)
                except ValueError:
                    raise InvalidRecord(f"metric {key!r} value {value!r} is not a number") from None
            rows.append((key, value, t, step))
        return rows

    def strings(self, ev: Event, limit: int) -> list[tuple[str, str]]:
        """``(key, value)`` pairs of a ``params`` or ``tags`` event."""
        d = ev.data.get("d")
        if type(d) is not dict or not d:
            raise InvalidRecord(f"{ev.kind} payload 'd' must be a non-empty object")
        out: list[tuple[str, str]] = []
        for key, value in d.items():
            self.key(key)
            if type(value) is not str or len(value) > limit or "\x00" in value:
                raise InvalidRecord(
                    f"{ev.kind} {key!r}: value must be a string of at most {limit} characters"
                )
            out.append((key, value))
        return out

    @staticmethod
    def artifact_ref(ev: Event) -> ArtifactRef:
        """The reference an ``artifact_ref`` event records."""
        d = ev.data
        path, digest, size, store = d.get("path"), d.get("digest"), d.get("size"), d.get("store")
        try:
            validate_logical_path(path)
        except InvalidLogicalPath as exc:
            raise InvalidRecord(f"artifact_ref: {exc}") from None
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise InvalidRecord(f"artifact_ref {path!r}: digest {digest!r} is not sha256:<64 hex>")
        if type(size) is not int or size < 0:
            raise InvalidRecord(f"artifact_ref {path!r}: size {size!r} is not an integer >= 0")
        if not isinstance(store, str):
            raise InvalidRecord(f"artifact_ref {path!r}: store {store!r} is not a path")
        return ArtifactRef(str(path), digest, size, store, ev.t)
