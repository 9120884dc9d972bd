#!/usr/bin/env python3
"""Benchmark ``ff-sync`` against MLflow's best plain client use and raw SQL; time an idle pass.

Usage::

    python tools/bench/bench_sync.py [--runs 20] [--keys 10] [--steps 500] [--repeat 3]
                                     [--idle 1000] [--dir DIR] [--json]
    python tools/bench/bench_sync.py --bulk [--steps 5000] [--repeat 3] [--profile FILE]
    python tools/bench/bench_sync.py --process [--steps 1500] [--repeat 3]
    python tools/bench/bench_sync.py --small [--repeat 7] [--postgres] [--profile DIR]

Generates spools with the real tracker: ``--runs`` runs × ``--keys`` metric keys × ``--steps``
steps, one ``log_metric`` event per point, plus 10 params and 5 tags per run. Then, each into
a fresh SQLite store whose schema is created beforehand (untimed):

(a) baseline — ``MlflowClient``: create the experiment and runs, ``log_batch`` with 1000
    metrics per call (params and tags in their own batches), from Metric objects already in
    memory (building them is not timed);
(b) ``ff-sync`` — one library pass (``sync_once``) over the same spools: read, verify, batch,
    send, record progress.

(a) and (b) alternate ``--repeat`` times, each into fresh stores, and the best time of each
counts (the machine may be shared). It prints metrics/s of each and the ratio (b)/(a) of wall
times (and of CPU times, which other processes on the machine disturb less); the
target is >= 0.9. Then (c): an idle pass over ``--idle`` fully synced segments — the wall
time of a whole ``ff-sync`` process, and whether that process imported mlflow
(``python -X importtime``).

``--bulk`` (1,000,000 metric events by default) measures the bulk SQL path against its two
baselines, ``--repeat`` rounds, each in fresh stores, in this order:

(x) bare ``sqlite3.executemany`` — the same metric rows (as MLflow stores them) inserted into
    the ``metrics`` table of a store MLflow created: a plain ``sqlite3`` connection, one
    ``executemany`` and one commit per run, rows already in memory. The most any writer
    going through Python's ``sqlite3`` gets out of that table; target: the bulk pass at
    >= 60 % of its rate;
(y) the bulk pass — ``sync_once`` with ``sync.bulk`` on (metrics straight into SQL);
(z) the ``log_batch`` pass — ``sync_once`` with ``sync.bulk: false`` (MLflow's ``log_batch``),
    after which the two stores are compared table by table (they must be identical).

Each round prints its rates and ratios (wall and CPU time); the summary gives the median and
the range over the rounds. ``--profile FILE`` then runs one more bulk pass under cProfile
(not counted).

``--process`` (300,000 metric events by default) times two whole processes, alternating,
``--repeat`` rounds, each into a fresh store whose schema is created untimed: ``ff-sync
--config ...`` (the command as cron runs it: interpreter start, imports, store opening, the
pass) against a ``log_batch`` script — a Python process that imports MLflow as a user's
script does, creates the experiment and the runs and logs the same data with
``MlflowClient.log_batch`` (1000 metrics per call, params and tags in their own batch),
computing the values itself instead of reading the spool. Target: ff-sync >= 8x faster.

``--small`` times what a cron job pays every minute: whole ``ff-sync`` processes against a
store that already holds the synced runs (SQLite; ``--postgres`` adds a database of a
throw-away PostgreSQL cluster, tests/_services.py). ``--repeat`` rounds, each an idle pass
(nothing new) then a small pass (one new run, 10 metrics, written beforehand, untimed). It
prints the median and range of each and the ratio of the medians small / idle (target
<= 3), and whether each kind of pass imported MLflow. ``--profile DIR`` writes one more
small pass's ``-X importtime`` log and cProfile file there (not counted) and prints the
imports that cost most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.9
BULK_TARGET_RATIO = 8.0
# The bulk pass's rate over bare executemany's (--bulk), and the whole process's (--process).
RAW_TARGET = 0.6
PROCESS_TARGET_RATIO = 8.0
SMALL_TARGET_RATIO = 3.0  # --small: a pass with one new run over an idle pass, at most
HERE = Path(__file__).resolve()
PYTHON = sys.executable

_WRITER = """
import os, sys
from formula_foundry.tracking import get_tracker
runs, keys, steps, first = (int(a) for a in sys.argv[1:5])
tracker = get_tracker()
for r in range(first, first + runs):
    tags = {f"tag{i}": f"v{i}" for i in range(5)}
    with tracker.start_run(run_name=f"bench-{r}", tags=tags) as run:
        run.log_params({f"param{i}": i * r for i in range(10)})
        t0 = 1_700_000_000_000 + r * 10_000_000
        for s in range(steps):
            for k in range(keys):
                run.log_metric(f"key{k}", (r + 1) * 0.001 * s + k, step=s, timestamp=t0 + s)
"""


def write_spools(spool: Path, runs: int, keys: int, steps: int, first: int = 0) -> None:
    env = {**os.environ, "FF_SPOOL_ROOT": str(spool), "FF_DURABILITY": "write"}
    env.pop("FF_CONFIG", None)
    subprocess.run(
        [PYTHON, "-c", textwrap.dedent(_WRITER), str(runs), str(keys), str(steps), str(first)],
        env=env,
        check=True,
        cwd=spool.parent,
    )


def fresh_store(path: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the schema
    return uri


def load_points(spool: Path) -> list[dict[str, Any]]:
    """The spooled runs as plain data (what a hand-written importer would hold)."""
    from formula_foundry.sync.engine.scan import scan_spool
    from formula_foundry.tracking.spool_reader import Event, SegmentReader

    runs: dict[str, dict[str, Any]] = {}
    for seg in scan_spool(spool):
        run = runs.setdefault(seg.spool_run_id, {"metrics": [], "params": {}, "tags": {}})
        for ev in SegmentReader(seg.path):
            if not isinstance(ev, Event):
                continue
            if ev.kind == "run_start":
                run["name"], run["t"] = ev.data["name"], ev.t
            elif ev.kind == "metrics":
                for k, v in ev.data["d"].items():
                    run["metrics"].append((k, float(v), ev.t, ev.data["step"]))
            elif ev.kind in ("params", "tags"):
                run[ev.kind].update(ev.data["d"])
    return list(runs.values())


def baseline(
    uri: str, artifact_dir: Path, runs: list[dict[str, object]]
) -> tuple[float, float, int]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    prepared = [
        (
            r,
            [Metric(k, v, t, s) for k, v, t, s in r["metrics"]],  # type: ignore[attr-defined]
            [Param(k, v) for k, v in r["params"].items()],  # type: ignore[attr-defined]
            [RunTag(k, v) for k, v in r["tags"].items()],  # type: ignore[attr-defined]
        )
        for r in runs
    ]
    n = sum(len(m) for _, m, _, _ in prepared)
    start, cpu = time.perf_counter(), time.process_time()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("formula-foundry", artifact_location=str(artifact_dir))
    for r, metrics, params, tags in prepared:
        run = client.create_run(exp, start_time=r["t"], run_name=r["name"])  # type: ignore[arg-type]
        client.log_batch(run.info.run_id, params=params, tags=tags)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
        client.set_terminated(run.info.run_id)
    return time.perf_counter() - start, time.process_time() - cpu, n


def ff_sync(
    uri: str, work: Path, spool: Path, bulk: bool = True, profile: Path | None = None
) -> tuple[float, float, int]:
    import dataclasses

    from formula_foundry.sync import load_sync_settings, sync_once

    os.environ.pop("FF_CONFIG", None)
    settings = _with(load_sync_settings(None, tracking_uri=uri, spool_root=spool), work)
    settings = dataclasses.replace(settings, sync_bulk=bulk)  # type: ignore[type-var]
    prof = None
    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start, cpu = time.perf_counter(), time.process_time()
    report = sync_once(settings)  # type: ignore[arg-type]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if prof is not None and profile is not None:
        prof.disable()
        prof.dump_stats(str(profile))
    if report.exit_code != 0:
        raise SystemExit(f"ff-sync pass failed: {report.summary()}")
    return elapsed, cpu, report.metrics


def _with(settings: object, work: Path) -> object:
    import dataclasses

    return dataclasses.replace(
        settings,  # type: ignore[type-var]
        sync_state_dir=work / "sync",
        artifact_root=work / "artifacts",
    )


def store_rows(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """The rows of each table that matters, run ids replaced by the spool's run ids."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        ff = dict(con.execute("SELECT run_uuid, value FROM tags WHERE key = 'ff.run_uuid'"))
        queries = {
            "runs": "SELECT run_uuid, name, status, start_time, end_time, lifecycle_stage "
            "FROM runs",
            "metrics": "SELECT run_uuid, key, value, timestamp, step, is_nan FROM metrics",
            "latest_metrics": "SELECT run_uuid, key, value, timestamp, step, is_nan "
            "FROM latest_metrics",
            "params": "SELECT run_uuid, key, value FROM params",
            "tags": "SELECT run_uuid, key, value FROM tags WHERE key != 'mlflow.parentRunId'",
        }
        return {
            name: sorted(
                tuple(
                    ff[r[0]] if i == 0 else repr(v) if isinstance(v, float) else v
                    for i, v in enumerate(r)
                )
                for r in con.execute(sql)
            )
            for name, sql in queries.items()
        }
    finally:
        con.close()


_BARE_INSERT = (
    "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?)"
)
# The same rows with the run's id and is_nan spelled in the statement: two binds fewer per row.
_BARE_INSERT_CONST = (
    "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, 0, '%s')"
)


def bare_executemany(
    db: Path, runs: list[dict[str, Any]], constants: bool = False
) -> tuple[float, float, int]:
    """Insert the runs' metric rows into ``db``'s metrics table with bare ``sqlite3``.

    The rows are the ones MLflow stores (the spool's values are finite: no NaN or inf to
    rewrite), each run under its own 32-hex id as MLflow's are; one ``executemany`` and one
    commit per run; ``constants``: the run id and is_nan in the statement, four values bound
    per row. (seconds, CPU seconds, rows).
    """
    import sqlite3
    import uuid

    prepared: list[tuple[str, list[tuple[Any, ...]]]] = []
    for r in runs:
        run_id = uuid.uuid4().hex
        if constants:
            sql = _BARE_INSERT_CONST % run_id
            prepared.append((sql, [(k, float(v), t, s) for k, v, t, s in r["metrics"]]))
        else:
            rows = [(k, float(v), t, s, False, run_id) for k, v, t, s in r["metrics"]]
            prepared.append((_BARE_INSERT, rows))
    n = sum(len(rows) for _, rows in prepared)
    con = sqlite3.connect(db)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for sql, rows in prepared:
            con.executemany(sql, rows)
            con.commit()
        return time.perf_counter() - start, time.process_time() - cpu, n
    finally:
        con.close()


def _spread(values: list[float], digits: int = 3) -> dict[str, float]:
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {
        "median": round(median, digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
    }


def bulk_mode(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """The bulk pass against bare executemany and against the log_batch pass (see above)."""
    spool = work / "runs"
    spool.mkdir()
    t = time.perf_counter()
    write_spools(spool, args.runs, args.keys, args.steps)
    gen_s = time.perf_counter() - t
    runs = load_points(spool)
    rounds: list[dict[str, object]] = []
    for i in range(args.repeat):
        # Both spellings of the bare insert; the faster one is the baseline of the round.
        bare = []
        for constants in (False, True):
            db = work / f"bare-{i}-{int(constants)}.db"  # a new name: MLflow caches by URI
            fresh_store(db)
            bare.append(bare_executemany(db, runs, constants))
            db.unlink()
        raw_s, raw_cpu, raw_n = min(bare)
        uri_b = fresh_store(work / f"bulk-{i}.db")
        bulk_s, bulk_cpu, n = ff_sync(uri_b, work / f"state-bulk-{i}", spool, bulk=True)
        uri_a = fresh_store(work / f"log_batch-{i}.db")
        base_s, base_cpu, m = ff_sync(uri_a, work / f"state-log-batch-{i}", spool, bulk=False)
        if not n == m == raw_n:
            raise SystemExit(f"metrics: bulk pass {n}, log_batch pass {m}, executemany {raw_n}")
        same = store_rows(work / f"log_batch-{i}.db") == store_rows(work / f"bulk-{i}.db")
        row: dict[str, object] = {
            "executemany_rows_per_s": round(raw_n / raw_s),
            "executemany_6_binds_rows_per_s": round(raw_n / bare[0][0]),
            "executemany_4_binds_rows_per_s": round(raw_n / bare[1][0]),
            "bulk_metrics_per_s": round(n / bulk_s),
            "log_batch_metrics_per_s": round(n / base_s),
            "bulk_over_executemany": round(raw_s / bulk_s, 3),
            "bulk_over_executemany_cpu": round(raw_cpu / bulk_cpu, 3),
            "bulk_over_log_batch": round(base_s / bulk_s, 2),
            "bulk_over_log_batch_cpu": round(base_cpu / bulk_cpu, 2),
            "identical": same,
        }
        for name in ("bulk", "log_batch"):
            (work / f"{name}-{i}.db").unlink()
        rounds.append(row)
        if not args.json:
            print(f"round {i + 1}: {row}", flush=True)
    result: dict[str, object] = {
        "metrics": sum(len(r["metrics"]) for r in runs),
        "rounds": rounds,
        "spool_write_s": round(gen_s, 2),
    }
    for key in (
        "executemany_rows_per_s",
        "bulk_metrics_per_s",
        "log_batch_metrics_per_s",
        "bulk_over_executemany",
        "bulk_over_executemany_cpu",
        "bulk_over_log_batch",
        "bulk_over_log_batch_cpu",
    ):
        result[key] = _spread([float(r[key]) for r in rounds])  # type: ignore[arg-type]
    result["targets"] = {
        "bulk_over_executemany": RAW_TARGET,
        "bulk_over_log_batch": BULK_TARGET_RATIO,
    }
    result["identical"] = all(r["identical"] for r in rounds)
    if args.profile is not None:
        uri = fresh_store(work / "profiled.db")
        ff_sync(uri, work / "state-profiled", spool, bulk=True, profile=args.profile)
    return result


_LOG_BATCH_SCRIPT = """
import sys
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

uri, artifacts = sys.argv[1], sys.argv[2]
runs, keys, steps = (int(a) for a in sys.argv[3:6])
client = MlflowClient(tracking_uri=uri)
exp = client.create_experiment("formula-foundry", artifact_location=artifacts)
for r in range(runs):
    t0 = 1_700_000_000_000 + r * 10_000_000
    run = client.create_run(exp, start_time=t0, run_name=f"bench-{r}")
    client.log_batch(
        run.info.run_id,
        params=[Param(f"param{i}", str(i * r)) for i in range(10)],
        tags=[RunTag(f"tag{i}", f"v{i}") for i in range(5)],
    )
    metrics = [
        Metric(f"key{k}", (r + 1) * 0.001 * s + k, t0 + s, s)
        for s in range(steps)
        for k in range(keys)
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    client.set_terminated(run.info.run_id)
"""


def _count_metrics(db: Path) -> int:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM metrics").fetchone()[0])
    finally:
        con.close()


def process_mode(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """A whole ff-sync process against a whole log_batch script (see above)."""
    spool = work / "runs"
    spool.mkdir()
    write_spools(spool, args.runs, args.keys, args.steps)
    ff = str(Path(PYTHON).with_name("ff-sync"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_"))}
    rounds: list[dict[str, object]] = []
    for i in range(args.repeat):
        uri = fresh_store(work / f"script-{i}.db")
        cmd = [PYTHON, "-c", _LOG_BATCH_SCRIPT, uri, str(work / f"script-art-{i}")]
        cmd += [str(args.runs), str(args.keys), str(args.steps)]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=work)
        script_s = time.perf_counter() - start
        db = work / f"ff-{i}.db"
        config = work / f"ff-{i}.yaml"
        config.write_text(
            f"tracking:\n  backend_store_uri: {fresh_store(db)}\n"
            f"  artifact_root: {work / f'ff-art-{i}'}\n"
            f"spool:\n  root: {spool}\nsync:\n  state_dir: {work / f'ff-state-{i}'}\n"
        )
        start = time.perf_counter()
        out = subprocess.run([ff, "--config", str(config)], env=env, capture_output=True, text=True)
        ff_s = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"ff-sync failed: {out.stdout}{out.stderr}")
        expected = args.runs * args.keys * args.steps
        for name in (f"script-{i}.db", f"ff-{i}.db"):
            found = _count_metrics(work / name)
            if found != expected:
                raise SystemExit(f"{name} holds {found} metrics, not {expected}")
        row: dict[str, object] = {
            "log_batch_script_s": round(script_s, 2),
            "ff_sync_s": round(ff_s, 2),
            "ratio": round(script_s / ff_s, 2),
        }
        rounds.append(row)
        if not args.json:
            print(f"round {i + 1}: {row}", flush=True)
    return {
        "events": args.runs * args.keys * args.steps,
        "rounds": rounds,
        "ratio": _spread([float(r["ratio"]) for r in rounds], 2),  # type: ignore[arg-type]
        "target_ratio": PROCESS_TARGET_RATIO,
    }


_FORKING_WRITER = """
import os, sys
from formula_foundry.tracking import get_tracker
runs, per_run = int(sys.argv[1]), int(sys.argv[2])
tracker = get_tracker()
for r in range(runs):
    with tracker.start_run(run_name=f"idle-{r}") as run:
        run.log_metric("x", 0.0, step=0)
        for i in range(1, per_run):
            pid = os.fork()
            if pid == 0:  # a forked writer opens a segment of its own (docs/spool-format.md)
                run.log_metric("x", float(i), step=i)
                os._exit(0)
            os.waitpid(pid, 0)
"""


def idle_pass(work: Path, segments: int) -> dict[str, object]:
    """Wall time of a whole ``ff-sync`` process over ``segments`` fully synced segments.

    The segments belong to ``segments // 100`` runs (forked writers, one segment each), so the
    initial sync creates few MLflow runs; the idle pass costs the same per segment either way.
    """
    spool = work / "idle-runs"
    spool.mkdir()
    per_run = min(100, segments)
    env = {**os.environ, "FF_SPOOL_ROOT": str(spool)}
    env.pop("FF_CONFIG", None)
    subprocess.run(
        [PYTHON, "-c", _FORKING_WRITER, str(max(1, segments // per_run)), str(per_run)],
        env=env,
        check=True,
        cwd=work,
    )
    found = len(list(spool.glob("*/seg-*.jsonl")))
    config = work / "idle.yaml"
    config.write_text(
        f"tracking:\n  backend_store_uri: sqlite:///{work / 'idle.db'}\n"
        f"  artifact_root: {work / 'idle-artifacts'}\n"
        f"spool:\n  root: {spool}\nsync:\n  state_dir: {work / 'idle-sync'}\n"
    )
    ff = str(Path(PYTHON).with_name("ff-sync"))
    first = subprocess.run([ff, "--config", str(config)], capture_output=True, text=True)
    if first.returncode != 0:
        raise SystemExit(f"initial sync failed: {first.stderr}{first.stdout}")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([ff, "--config", str(config)], capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if out.returncode != 0 or "0 events" not in out.stdout:
            raise SystemExit(f"idle pass was not idle: {out.stdout}{out.stderr}")
    probe = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "formula_foundry.sync", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    imported = any(
        line.rsplit("|", 1)[-1].strip().split(".")[0] == "mlflow"
        for line in probe.stderr.splitlines()
        if line.startswith("import time:")
    )
    return {"segments": found, "wall_s": round(best, 3), "mlflow_imported": imported}


_SMALL_WRITER = """
import sys
from formula_foundry.tracking import get_tracker
with get_tracker().start_run(run_name=f"small-{sys.argv[1]}") as run:
    for k in range(10):
        run.log_metric(f"key{k}", 0.5 * k, step=0)
"""


def _small_store(backend: str, work: Path, admin: str | None) -> str:
    if backend == "sqlite":
        return fresh_store(work / "small.db")
    from tests._services import create_database, migrated_template

    assert admin is not None
    return create_database(admin, template=migrated_template(admin, work / "pg-scratch"))


def _ff_process(ff: str, config: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([ff, "--config", str(config)], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"ff-sync failed: {out.stdout}{out.stderr}")
    return took, out.stdout


def _imports_mlflow(config: Path, env: dict[str, str], trace: Path | None = None) -> bool:
    """Runs one more pass under ``-X importtime``: whether it imported mlflow."""
    probe = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "formula_foundry.sync", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
    )
    if trace is not None:
        trace.write_text(probe.stderr)
    return any(
        line.rsplit("|", 1)[-1].strip().split(".")[0] == "mlflow"
        for line in probe.stderr.splitlines()
        if line.startswith("import time:")
    )


def _top_imports(trace: Path, n: int = 8) -> list[tuple[str, float]]:
    """The top-level packages of an ``-X importtime`` log that took longest (cumulative s)."""
    cost: dict[str, float] = {}
    for line in trace.read_text().splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if name.startswith(" ") and not name.startswith("  "):  # one space: imported at top
            top = name.strip()
            cost[top] = max(cost.get(top, 0.0), int(parts[1]) / 1e6)
    return sorted(cost.items(), key=lambda kv: -kv[1])[:n]


def small_mode(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Idle passes against passes with one new run of 10 metrics, whole processes (above)."""
    import contextlib

    sys.path.insert(0, str(HERE.parents[2]))
    ff = str(Path(PYTHON).with_name("ff-sync"))
    result: dict[str, object] = {"target_ratio": SMALL_TARGET_RATIO}
    with contextlib.ExitStack() as stack:
        admin = None
        if args.postgres:
            from tests._services import postgres_cluster

            admin = stack.enter_context(postgres_cluster())
        for backend in ("sqlite", "postgresql") if args.postgres else ("sqlite",):
            base = work / backend
            spool = base / "runs"
            spool.mkdir(parents=True)
            uri = _small_store(backend, base, admin)
            config = base / "ff.yaml"
            config.write_text(
                f"tracking:\n  backend_store_uri: {uri}\n  artifact_root: {base / 'art'}\n"
                f"spool:\n  root: {spool}\nsync:\n  state_dir: {base / 'state'}\n"
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_"))}
            writer = {**env, "FF_SPOOL_ROOT": str(spool), "FF_DURABILITY": "write"}

            def new_run(i: int, writer: dict[str, str] = writer, base: Path = base) -> None:
                cmd = [PYTHON, "-c", _SMALL_WRITER, str(i)]
                subprocess.run(cmd, env=writer, check=True, cwd=base)

            new_run(-1)
            _ff_process(ff, config, env)  # the first pass: identity, experiment, one run
            idle: list[float] = []
            small: list[float] = []
            for i in range(args.repeat):
                took, out = _ff_process(ff, config, env)
                if "0 events" not in out:
                    raise SystemExit(f"the idle pass was not idle: {out}")
                idle.append(took)
                new_run(i)
                took, out = _ff_process(ff, config, env)
                if "1 run, 12 events" not in out:
                    raise SystemExit(f"the small pass did not sync one run of 10 metrics: {out}")
                small.append(took)
                if not args.json:
                    print(f"{backend} {i + 1}: idle {idle[-1]:.3f} s, small {small[-1]:.3f} s")
            idle_imports = _imports_mlflow(config, env)
            new_run(args.repeat)
            trace = args.profile / f"small-{backend}.importtime" if args.profile else None
            small_imports = _imports_mlflow(config, env, trace)
            row: dict[str, object] = {
                "idle_s": _spread(idle),
                "small_s": _spread(small),
                "ratio": round(_spread(small)["median"] / _spread(idle)["median"], 2),
                "round_ratios": _spread([s / i for s, i in zip(small, idle, strict=True)], 2),
                "idle_imports_mlflow": idle_imports,
                "small_imports_mlflow": small_imports,
            }
            if trace is not None:
                row["top_imports_s"] = _top_imports(trace)
                new_run(args.repeat + 1)
                prof = args.profile / f"small-{backend}.prof"
                cmd = [PYTHON, "-m", "cProfile", "-o", str(prof), ff, "--config", str(config)]
                subprocess.run(cmd, env=env, check=True, capture_output=True)
            result[backend] = row
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument(
        "--steps", type=int, default=None, help="default 500, --bulk 5000, --process 1500"
    )
    ap.add_argument("--bulk", action="store_true", help="bulk SQL path vs log_batch (see above)")
    ap.add_argument("--process", action="store_true", help="whole ff-sync process vs a script")
    ap.add_argument("--small", action="store_true", help="a pass with one new run vs idle")
    ap.add_argument("--postgres", action="store_true", help="--small: PostgreSQL too")
    ap.add_argument(
        "--profile", type=Path, default=None, help="bulk: cProfile file; --small: a folder"
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default mode: best of N)")
    ap.add_argument("--idle", type=int, default=1000, help="segments of the idle pass (0: skip)")
    ap.add_argument("--only-idle", action="store_true", help="only the idle pass (--idle N)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 5000 if args.bulk else 1500 if args.process else 500
    if args.bulk or args.process:
        return run_bulk(args)
    if args.small:
        return run_small(args)
    if args.only_idle:
        work = Path(tempfile.mkdtemp(prefix="ff-bench-idle-", dir=args.dir))
        try:
            idle = idle_pass(work, args.idle or 10_000)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(idle) if args.json else f"idle pass: {idle}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="ff-bench-sync-", dir=args.dir))
    try:
        spool = work / "runs"
        spool.mkdir()
        t = time.perf_counter()
        write_spools(spool, args.runs, args.keys, args.steps)
        gen_s = time.perf_counter() - t
        runs = load_points(spool)
        base_s = sync_s = base_cpu = sync_cpu = float("inf")
        n = m = 0
        # Alternate the contenders and keep the best of each: a shared machine is noisy.
        for i in range(args.repeat):
            uri_a = fresh_store(work / f"a{i}.db")
            uri_b = fresh_store(work / f"b{i}.db")
            took, cpu, n = baseline(uri_a, work / "artifacts-a", runs)
            base_s, base_cpu = min(base_s, took), min(base_cpu, cpu)
            took, cpu, m = ff_sync(uri_b, work / f"state-{i}", spool)
            sync_s, sync_cpu = min(sync_s, took), min(sync_cpu, cpu)
            if m != n:
                raise SystemExit(f"ff-sync sent {m} metrics, the baseline {n}")
        result: dict[str, object] = {
            "metrics": n,
            "repeat": args.repeat,
            "spool_write_s": round(gen_s, 2),
            "baseline_s": round(base_s, 2),
            "baseline_metrics_per_s": round(n / base_s),
            "ff_sync_s": round(sync_s, 2),
            "ff_sync_metrics_per_s": round(n / sync_s),
            "ratio": round(base_s / sync_s, 3),
            "cpu_ratio": round(base_cpu / sync_cpu, 3),
            "target_ratio": TARGET_RATIO,
        }
        if args.idle:
            result["idle"] = idle_pass(work, args.idle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0 if float(result["ratio"]) >= TARGET_RATIO else 1  # type: ignore[arg-type]


def run_bulk(args: argparse.Namespace) -> int:
    """``--bulk`` or ``--process``: print the result, exit 0 if every target is met."""
    prefix = "ff-bench-bulk-" if args.bulk else "ff-bench-process-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.dir))
    try:
        result = bulk_mode(args, work) if args.bulk else process_mode(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "rounds":
                print(f"{key:>26}: {value}")
    if args.process:
        return 0 if result["ratio"]["median"] >= PROCESS_TARGET_RATIO else 1  # type: ignore[index]
    ok = (
        result["identical"] and result["bulk_over_executemany"]["median"] >= RAW_TARGET  # type: ignore[index]
    )
    return 0 if ok else 1


def run_small(args: argparse.Namespace) -> int:
    """``--small``: print the result, exit 0 if every ratio is within the target."""
    work = Path(tempfile.mkdtemp(prefix="ff-bench-small-", dir=args.dir))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        result = small_mode(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value}")
    rows = [v for v in result.values() if isinstance(v, dict)]
    return 0 if all(float(r["ratio"]) <= SMALL_TARGET_RATIO for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
