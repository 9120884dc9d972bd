"""A store's content, normalised for comparison: what must be equal whichever way runs came in.

Equal up to run and experiment ids, wall-clock timestamps (start/end times, metric timestamps
the script did not choose) and ``ff.*`` bookkeeping: experiments (those holding runs, and
Default), run names, statuses, parent links (by name), params, tags (MLflow's system tags
included; ids in them replaced by names), every metric point (step, value, NaN flag) and the
latest metrics. Also whether each run has an end time, and (``chosen_below``) the times a
script chose itself.

``diff`` and ``assert_same`` show two dumps side by side; ``PRELUDE`` is the helper scripts use
to print each call's outcome (what the two ways must agree on besides the store).
"""

from __future__ import annotations

import difflib
import math
import pprint
import sqlite3
from pathlib import Path
from typing import Any

# Tags whose values are wall-clock or host dependent in a way two runs of one script differ.
VOLATILE_TAGS = frozenset({"mlflow.source.git.commit"})


def _value(value: float, is_nan: int) -> object:
    return "NaN" if is_nan or (isinstance(value, float) and math.isnan(value)) else value


def _time(ts: int | None, timestamps: bool, chosen_below: int | None) -> tuple[object, ...]:
    if timestamps:
        return (ts,)
    if chosen_below is not None:
        return (ts if ts is not None and ts < chosen_below else "wall",)
    return ()


def dump(db: Path, *, timestamps: bool = False, chosen_below: int | None = None) -> dict[str, Any]:
    """The store at ``db`` as plain data keyed by names. ``timestamps``: keep metric times.

    ``chosen_below``: keep the metric times (and run start/end times) smaller than this, the
    ones a script passed itself, and write ``"wall"`` for the others (wall-clock times)."""
    con = sqlite3.connect(db)
    try:
        exps = dict(con.execute("select experiment_id, name from experiments"))
        runs = con.execute(
            "select run_uuid, name, status, experiment_id, lifecycle_stage, start_time, end_time"
            " from runs"
        ).fetchall()
        names = {r[0]: r[1] for r in runs}
        out: dict[str, Any] = {}
        for spool_run_id, name, status, exp_id, stage, start, end in runs:
            tags = dict(
                con.execute("select key, value from tags where run_uuid=?", (spool_run_id,))
            )
            tags = {
                k: v for k, v in tags.items() if not k.startswith("ff.") and k not in VOLATILE_TAGS
            }
            if "mlflow.parentRunId" in tags:
                tags["mlflow.parentRunId"] = names.get(tags["mlflow.parentRunId"], "?")
            params = dict(
                con.execute("select key, value from params where run_uuid=?", (spool_run_id,))
            )
            points: dict[str, list[Any]] = {}
            for key, value, ts, step, is_nan in con.execute(
                "select key, value, timestamp, step, is_nan from metrics where run_uuid=?",
                (spool_run_id,),
            ):
                p = (step, _value(value, is_nan), *_time(ts, timestamps, chosen_below))
                points.setdefault(key, []).append(p)
            latest = {
                key: (step, _value(value, is_nan), *_time(ts, timestamps, chosen_below))
                for key, value, ts, step, is_nan in con.execute(
                    "select key, value, timestamp, step, is_nan from latest_metrics"
                    " where run_uuid=?",
                    (spool_run_id,),
                )
            }
            entry = {
                "experiment": exps[exp_id],
                "status": status,
                "lifecycle": stage,
                "ended": end is not None,
                "params": params,
                "tags": tags,
                "metrics": {k: sorted(v, key=repr) for k, v in points.items()},
                "latest": latest,
            }
            if chosen_below is not None:
                entry["times"] = _time(start, False, chosen_below) + _time(end, False, chosen_below)
            key = f"{exps[exp_id]}/{name}"
            assert key not in out, f"two runs named {key!r}: give each run of a script its own name"
            out[key] = entry
        used = {exps[r[3]] for r in runs} | {"Default"}
        out["experiments"] = sorted(n for n in exps.values() if n in used)
        return out
    finally:
        con.close()


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 120:
        return f"{value[:60]}...<{len(value)} characters>...{value[-20:]}"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_shorten(v) for v in value)
    return value


def diff(a: Any, b: Any, names: tuple[str, str] = ("direct", "synced")) -> str:
    """A unified diff of two dumps (long strings shortened, with their lengths)."""
    left, right = (pprint.pformat(_shorten(x), width=100).splitlines() for x in (a, b))
    return "\n".join(difflib.unified_diff(left, right, names[0], names[1], lineterm="", n=4))


def store_problem(direct_db: Path, synced_db: Path, **kw: Any) -> str | None:
    """How the two stores differ (``dump`` with ``kw``), or None if they hold the same."""
    a, b = dump(direct_db, **kw), dump(synced_db, **kw)
    if a == b:
        return None
    return "the stores differ (- straight into SQLite, + through the spool):\n" + diff(a, b)


def output_problem(direct: str, spooled: str) -> str | None:
    """How two scripts' outputs differ, or None if they printed the same lines."""
    a, b = direct.splitlines(), spooled.splitlines()
    if a == b:
        return None
    return "the scripts printed different lines (- direct, + spool):\n" + "\n".join(
        difflib.unified_diff(a, b, "direct", "spool", lineterm="", n=2)
    )


def assert_same(direct_db: Path, synced_db: Path, **kw: Any) -> dict[str, Any]:
    """Assert the two stores hold the same (``dump`` with ``kw``); return the dump."""
    problem = store_problem(direct_db, synced_db, **kw)
    assert problem is None, problem
    return dump(synced_db, **kw)


def assert_same_output(direct: str, spooled: str) -> list[str]:
    """Assert two scripts printed the same lines; return them."""
    problem = output_problem(direct, spooled)
    assert problem is None, problem
    return direct.splitlines()


# What scripts paste at their top to print each call's outcome: the exception's class and
# MLflow error code (messages and ids differ between the ways; outcomes must not).
PRELUDE = """\
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException


def outcome(exc):
    if isinstance(exc, MlflowException):
        return f"{type(exc).__name__}({exc.error_code})"
    return type(exc).__name__


def do(label, fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "wait"):  # synchronous=False: the outcome is the operation's
            result.wait()
    except Exception as exc:
        print(f"{label}: {outcome(exc)}", flush=True)
        return None
    print(f"{label}: ok", flush=True)
    return result
"""
