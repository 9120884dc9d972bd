#!/usr/bin/env python3
"""Benchmark ``ff-sync`` against MLflow's best plain client use, and time an idle pass.

Usage::

    python tools/bench/bench_sync.py [--runs 20] [--keys 10] [--steps 500] [--repeat 3]
                                     [--idle 1000] [--dir DIR] [--json]

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


def bulk_mode(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """ff-sync with the bulk metric path vs with log_batch, same spools, same script."""
    spool = work / "runs"
    spool.mkdir()
    t = time.perf_counter()
    write_spools(spool, args.runs, args.keys, args.steps)
    gen_s = time.perf_counter() - t
    uri_a, uri_b = fresh_store(work / "log_batch.db"), fresh_store(work / "bulk.db")
    base_s, base_cpu, n = ff_sync(uri_a, work / "state-a", spool, bulk=False)
    bulk_s, bulk_cpu, m = ff_sync(uri_b, work / "state-b", spool, bulk=True, profile=args.profile)
    if m != n:
        raise SystemExit(f"the bulk pass sent {m} metrics, the log_batch pass {n}")
    same = store_rows(work / "log_batch.db") == store_rows(work / "bulk.db")
    return {
        "metrics": n,
        "spool_write_s": round(gen_s, 2),
        "log_batch_s": round(base_s, 2),
        "log_batch_metrics_per_s": round(n / base_s),
        "bulk_s": round(bulk_s, 2),
        "bulk_metrics_per_s": round(n / bulk_s),
        "ratio": round(base_s / bulk_s, 2),
        "cpu_ratio": round(base_cpu / bulk_cpu, 2),
        "target_ratio": BULK_TARGET_RATIO,
        "identical": same,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="default 500, with --bulk 5000")
    ap.add_argument("--bulk", action="store_true", help="bulk SQL path vs log_batch (see above)")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile file of the bulk pass")
    ap.add_argument("--repeat", type=int, default=3, help="best of N alternating runs")
    ap.add_argument("--idle", type=int, default=1000, help="segments of the idle pass (0: skip)")
    ap.add_argument("--only-idle", action="store_true", help="only the idle pass (--idle N)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 5000 if args.bulk else 500
    if args.bulk:
        return run_bulk(args)
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
    work = Path(tempfile.mkdtemp(prefix="ff-bench-bulk-", dir=args.dir))
    try:
        result = bulk_mode(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    ok = result["identical"] and float(result["ratio"]) >= BULK_TARGET_RATIO  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
