"""Metric points of the drop-in's write paths: checking them, grouping a batch into metrics
events, and each key's latest point (what ``get_run`` shows) as MLflow orders points.

MLflow-free, like :mod:`~formula_foundry.dropin.run_book`, which writes what these build.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

import orjson

from formula_foundry.dropin.spool_runs import RunState
from formula_foundry.tracking.events import INT64_MAX, INT64_MIN, check_key, int64, metric_value

_NAN_STORED: Final = 0.0  # MLflow stores NaN as 0 with a flag, and compares that
_MAX: Final = sys.float_info.max
_dumps = orjson.dumps
# Keys checked before, with their JSON: a known key skips the check on the hot paths.
key_json: dict[str, bytes] = {}
_KEY_CACHE_LIMIT: Final = 1 << 16
_UNSET: Final = object()

Point = tuple[int, int, float]  # step, timestamp, value as given (NaN, ±inf kept)
# A metric point as MLflow's Metric carries it: key, value, timestamp, step (checked here).
MetricRow = tuple[object, object, object, object]
Group = tuple[int, int, dict[str, float | str]]  # one metrics event: t, step, key -> spelling


def stored(value: float) -> float:
    """The value MLflow stores and compares for ``value`` (NaN → 0, ±inf → ±max float)."""
    if value - value == 0.0:
        return value
    if value != value:
        return _NAN_STORED
    return _MAX if value > 0 else -_MAX


def newer(a: Point, b: Point) -> bool:
    """Whether point ``a`` replaces ``b`` as the latest (MLflow: step, time, stored value)."""
    return (a[0], a[1], stored(a[2])) > (b[0], b[1], stored(b[2]))


def valid_key(key: object, what: str, run_id: str) -> str:
    checked = check_key(key, what, run_id)
    if len(key_json) < _KEY_CACHE_LIMIT:
        key_json[checked] = _dumps(checked)
    return checked


def check_step(step: object, key: str, run_id: str) -> int:
    # MLflow's store refuses a missing step or time (its clients always fill them in).
    return int64(_whole(step), "step", key, run_id)


def check_time(timestamp: object, key: str, run_id: str) -> int:
    return int64(_whole(timestamp), "timestamp", key, run_id, minimum=0)


def _whole(number: object) -> object:
    """A float holding a whole number as the int it is: MLflow's SQL store takes ``2.0`` as a
    step (its integer column keeps 2); a fraction stays refused by ``int64``."""
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return number


def metric_groups(rows: Sequence[MetricRow], run_id: str) -> tuple[list[Group], bool]:
    """The metrics events of a batch, as (time, step, {key: spelling}): consecutive points of
    one (time, step) share an event (one event per ``log_metrics`` call); a key seen again
    starts a new one. Also whether each event's step is above the one before (then the last
    event holding a key has its latest point)."""
    groups: list[Group] = []
    current: dict[str, float | str] = {}
    at_t: int | None = None
    at_s: int | None = None
    # The step and timestamp objects last checked: points of one step usually share them.
    t_obj: object = _UNSET
    s_obj: object = _UNSET
    t = s = 0
    rising = True
    for key, value, timestamp, step in rows:
        if key.__class__ is not str or key not in key_json:
            key = valid_key(key, "metric", run_id)
        if value.__class__ is not float or value - value != 0.0:
            value = metric_value(value, key, run_id)
        if step is not s_obj:
            s = (
                step
                if step.__class__ is int and INT64_MIN <= step <= INT64_MAX
                else check_step(step, key, run_id)
            )
            s_obj = step
        if timestamp is not t_obj:
            t = (
                timestamp
                if timestamp.__class__ is int and 0 <= timestamp <= INT64_MAX
                else check_time(timestamp, key, run_id)
            )
            t_obj = timestamp
        if t != at_t or s != at_s or key in current:
            if at_s is not None and s <= at_s:
                rising = False
            current = {}
            at_t, at_s = t, s
            groups.append((t, s, current))
        current[key] = value
    return groups, rising


def batch_latest(groups: list[Group], rising: bool) -> dict[str, Point]:
    """Each key's latest point among ``groups`` (MLflow's order: step, time, stored value)."""
    if rising:
        last: dict[str, Group] = {}
        for group in groups:
            last.update(dict.fromkeys(group[2], group))
        return {key: (s, t, _float(d[key])) for key, (t, s, d) in last.items()}
    best: dict[str, Point] = {}
    for t, s, d in groups:
        for key, spelled in d.items():
            point = (s, t, _float(spelled))
            old = best.get(key)
            if old is None or newer(point, old):
                best[key] = point
    return best


def merge_pending(state: RunState) -> None:
    """Merge the run's pending ``log_metrics`` group into its latest points (its lock held)."""
    pending = state.pending
    if pending is None:
        return
    t, s, d = pending
    latest = state.latest
    for key, value in d.items():
        old = latest.get(key)
        if old is None or s > old[0] or (s == old[0] and newer((s, t, value), old)):
            latest[key] = (s, t, value)
    state.pending = None


def _float(spelled: float | str) -> float:
    # "NaN", "Infinity", "-Infinity" are what float() reads back
    return spelled if spelled.__class__ is float else float(spelled)
