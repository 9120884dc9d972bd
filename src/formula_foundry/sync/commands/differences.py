"""What ``ff-sync verify`` reports: a :class:`Difference` per way the destination differs from
the spools, its message said the same way for every kind (kinds and JSON keys:
docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from formula_foundry.sync.commands.expected import Point

SHOWN_POINTS: Final = 10  # metric points listed per difference; ``count`` has them all


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the destination differs from the spools."""

    run: str
    kind: str
    message: str
    key: str | None = None
    expected: Any = None
    actual: Any = None
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "kind": self.kind,
            "key": self.key,
            "expected": self.expected,
            "actual": self.actual,
            "count": self.count,
            "message": self.message,
        }


_MESSAGES: Final = {
    "deleted_run": "the run is deleted in the destination",
    "experiment_mismatch": "experiment is {actual!r}, the spool says {expected!r}",
    "start_time_mismatch": "start time is {actual}, the spool says {expected}",
    "status_mismatch": "status is {actual}, the spool says {expected}",
    "end_time_mismatch": "end time is {actual}, the spool says {expected}",
    "missing_param": "param {key!r} = {expected!r} is missing",
    "extra_param": "param {key!r} = {actual!r} is not in the spool",
    "param_mismatch": "param {key!r} is {actual!r}, the spool says {expected!r}",
    "missing_tag": "tag {key!r} = {expected!r} is missing",
    "extra_tag": "tag {key!r} = {actual!r} is not in the spool",
    "tag_mismatch": "tag {key!r} is {actual!r}, the spool says {expected!r}",
    "missing_artifact_ref": "artifact reference {key!r} is missing",
    "extra_artifact_ref": "artifact reference {key!r} is not in the spool",
    "artifact_ref_mismatch": "artifact reference {key!r} differs from the spool",
    "missing_artifact": "artifact {key!r} ({expected[0]} bytes) is missing",
    "superseded_artifact": "artifact {key!r} holds a file of {actual[0]} bytes; the spool's "
    "last file at that path is above sync.upload_max_bytes: a reference, no file",
    "artifact_mismatch": "artifact {key!r} holds {actual[0]} bytes, {actual[1]}; the spool "
    "logged {expected[0]} bytes, {expected[1]}",
}


def diff_of(run: str, kind: str, key: str | None, expected: Any, actual: Any) -> Difference:
    message = _MESSAGES[kind].format(key=key, expected=expected, actual=actual)
    return Difference(run, kind, f"run {run}: {message}", key, expected, actual)


def points_of(run: str, kind: str, key: str, points: set[Point]) -> Difference:
    ordered = sorted(points, key=lambda p: (p[0], p[1], str(p[2])))
    shown = [[s, t, v] for s, t, v in ordered[:SHOWN_POINTS]]
    listed = ", ".join(f"(step {s}, t {t}, {v!r})" for s, t, v in shown)
    more = f" and {len(ordered) - SHOWN_POINTS} more" if len(ordered) > SHOWN_POINTS else ""
    where = "missing from the destination" if kind == "missing" else "not in the spool"
    message = f"run {run}: metric {key!r}: {len(ordered)} points {where}: {listed}{more}"
    if kind == "missing":
        return Difference(run, "missing_metric_points", message, key, shown, None, len(ordered))
    return Difference(run, "extra_metric_points", message, key, None, shown, len(ordered))
