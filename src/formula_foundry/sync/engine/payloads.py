"""Check event payloads before they go anywhere near the destination.

The tracker validates everything at log time, and every line carries a checksum; still, a
segment is input from another machine, written by another version, possibly edited by hand.
A payload MLflow would refuse would make it refuse the whole batch (and block its run), so
each record is checked here with the tracker's own rules; one that fails is quarantined as
``invalid`` and the rest of the run goes on. Keys are checked once per pass.

Every field is checked for type and range before anything uses it — times, steps and sizes
are int64 (what the destination's columns hold) — so no value from a spool can raise out of
the replay. The same checks decide what ``ff-sync verify`` expects
(:mod:`formula_foundry.sync.commands.expected`).

Tags the sync owns (``ff.*`` and the MLflow system tags it writes itself, see
:func:`~formula_foundry.tracking.events.reserved_tag_reason`) are never taken from a ``tags``
event: run identity comes from the spool folder and the ``run_start`` only. Such a tag (from a
spool written before the tracker refused them) is left out and quarantined as ``reserved``;
the event's other tags are synced.
"""

from __future__ import annotations

import re
from typing import Final

from formula_foundry.errors import ValidationError
from formula_foundry.ids import is_run_id
from formula_foundry.substrate.errors import InvalidLogicalPath
from formula_foundry.substrate.logical_path import validate_logical_path
from formula_foundry.sync.engine.sink import ArtifactRef, MetricRow, RunSpec
from formula_foundry.tracking.events import (
    END_STATUSES,
    INT64_MAX,
    INT64_MIN,
    MAX_TAG_VALUE_LENGTH,
    check_key,
    check_name,
    decode_metric_value,
    reserved_tag_reason,
    source_type,
    system_tags,
)
from formula_foundry.tracking.spool_reader import Event

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_SHOWN: Final = 60  # characters of a bad value shown in a reason


class InvalidRecord(Exception):
    """A record whose payload breaks the format (its message says how): it is quarantined."""


def conflict_reason(key: str, old: str, new: str) -> str:
    """The quarantine reason of a param that already has another value."""
    return (
        f"param {key!r} is already {old!r}; this record sets {new!r} "
        "(params are write-once: the first value synced stays)"
    )


def shown(value: object) -> str:
    """``repr(value)``, cut short: a reason names a bad value without copying a huge one."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}...({len(text)} characters)"


def check_time(ev: Event) -> None:
    """Every event's time is a timestamp in ms: within ``[0, 2**63-1]``."""
    t = ev.t
    if type(t) is not int or not 0 <= t <= INT64_MAX:
        raise InvalidRecord(f"{ev.kind} time {shown(t)} is outside [0, {INT64_MAX}]")


def end_status(ev: Event) -> str:
    """The status a ``run_end`` event sets."""
    status = ev.data.get("status")
    if type(status) is not str or status not in END_STATUSES:
        raise InvalidRecord(f"run_end status {shown(status)} is not one of {sorted(END_STATUSES)}")
    return status


def end_time(ev: Event) -> int | None:
    """The end time a ``run_end`` sets: its ``t``, or none at all when it says
    ``"end_time": null`` (MLflow's ``update_run`` with a status leaves it unset)."""
    return None if "end_time" in ev.data and ev.data["end_time"] is None else ev.t


def end_reason(ev: Event) -> str | None:
    """The reason a ``run_end`` gives (a text the sync sets as ``ff.sync.end_reason``), if any."""
    reason = ev.data.get("reason")
    if reason is None:
        return None
    try:
        return check_name("run_end reason", reason, MAX_TAG_VALUE_LENGTH)
    except ValidationError as exc:
        raise InvalidRecord(str(exc)) from None


def run_end(ev: Event) -> tuple[str, int | None, str | None]:
    """What a ``run_end`` sets: its status, end time and reason (each checked as above)."""
    return end_status(ev), end_time(ev), end_reason(ev)


def run_spec(spool_run_id: str, ev: Event) -> RunSpec:
    """The run a ``run_start`` creates: the one reading of a ``run_start``, shared by the replay
    (which creates the run from the first valid one, :mod:`formula_foundry.sync.engine.runs`), a
    resume, and ``verify``'s expected state. Raises :class:`InvalidRecord` if it cannot create
    (or reopen) a run."""
    d = ev.data
    experiment, name, parent = d.get("experiment"), d.get("name"), d.get("parent")
    if (
        not isinstance(experiment, str)
        or not experiment.strip()
        or ev.t <= 0
        or not isinstance(name, str)
        or not name.strip()
        or (parent is not None and not is_run_id(parent))
    ):
        raise InvalidRecord("run_start lacks a valid experiment, name or time")

    def text(key: str) -> str:
        value = d.get(key)
        return value if isinstance(value, str) and value else "unknown"

    return RunSpec(
        spool_run_id=spool_run_id,
        experiment=experiment,
        name=name,
        start_time=ev.t,
        user=text("user"),
        host=text("host"),
        source=text("source"),
        parent_spool_run_id=parent,
        source_type=source_type(d),
        system_tags=system_tags(d),
    )


def run_start_problem(ev: Event) -> str | None:
    """Why a ``run_start`` event cannot create (or reopen) its run; None if it can."""
    try:
        run_spec("", ev)
    except InvalidRecord as exc:
        return str(exc)
    return None


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
        if type(step) is not int or not INT64_MIN <= step <= INT64_MAX or not 0 <= t <= INT64_MAX:
            raise InvalidRecord(
                f"metric step {shown(step)} or timestamp {shown(t)} is not an int64 "
                "(timestamps: >= 0)"
            )
        rows: list[MetricRow] = []
        keys_ok = self.keys_ok
        for key, value in d.items():
            if key not in keys_ok:
                self.key(key)
            if type(value) is not float:
                try:
                    value = decode_metric_value(value)
                except ValueError:
                    raise InvalidRecord(
                        f"metric {key!r} value {shown(value)} is not a number"
                    ) from None
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

    def tags(self, ev: Event, limit: int) -> tuple[list[tuple[str, str]], str | None]:
        """The tags of a ``tags`` event the sync may write, and why it left others out."""
        kept: list[tuple[str, str]] = []
        reasons: list[str] = []
        for key, value in self.strings(ev, limit):
            reason = reserved_tag_reason(key)
            if reason is None:
                kept.append((key, value))
            else:
                reasons.append(reason)
        return kept, "; ".join(reasons) or None

    def tag_keys(self, ev: Event) -> list[str]:
        """The keys a ``tag_delete`` event deletes."""
        keys = ev.data.get("keys")
        if type(keys) is not list or not keys:
            raise InvalidRecord("tag_delete payload 'keys' must be a non-empty list of tag keys")
        for key in keys:
            self.key(key)
            reason = reserved_tag_reason(key)
            if reason is not None:
                raise InvalidRecord(f"tag_delete: {reason}")
        return list(keys)

    @staticmethod
    def artifact_ref(ev: Event) -> ArtifactRef:
        """The reference an ``artifact_ref`` event records."""
        return _stored_object(ev, "artifact_ref")

    @staticmethod
    def artifact(ev: Event) -> ArtifactRef:
        """The stored file an ``artifact`` event logs (same fields as a reference)."""
        return _stored_object(ev, "artifact")


def _stored_object(ev: Event, kind: str) -> ArtifactRef:
    """``path``, ``digest``, ``size`` and ``store`` of an ``artifact_ref`` or ``artifact``."""
    d = ev.data
    path, digest, size, store = d.get("path"), d.get("digest"), d.get("size"), d.get("store")
    try:
        validate_logical_path(path)
    except InvalidLogicalPath as exc:
        raise InvalidRecord(f"{kind}: {exc}") from None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidRecord(f"{kind} {path!r}: digest {shown(digest)} is not sha256:<64 hex>")
    if type(size) is not int or not 0 <= size <= INT64_MAX:
        raise InvalidRecord(
            f"{kind} {path!r}: size {shown(size)} is not an integer in [0, {INT64_MAX}]"
        )
    if type(store) is not str or not store or "\x00" in store:
        raise InvalidRecord(f"{kind} {path!r}: store {shown(store)} is not a path")
    return ArtifactRef(str(path), digest, size, store, ev.t)
