#!/usr/bin/env python3
"""Benchmark parallel ``ff-sync`` passes over HTTP against a single-threaded ``log_batch`` client.

Usage::

    python tools/bench/bench_sync_http.py [--runs 20] [--keys 10] [--steps 500]
                                          [--workers 1,4,8] [--server-workers 2]
                                          [--postgres] [--no-http] [--repeat 3]
                                          [--dir DIR] [--json]

Generates one spool with the real tracker: ``--runs`` runs × ``--keys`` metric keys ×
``--steps`` steps, one ``log_metric`` event per point, plus 10 params and 5 tags per run.
Then, each against a *fresh* local ``mlflow server`` (own SQLite store, started untimed, so
no measurement writes into a store another one has grown; ff-sync would also find the runs of
an earlier pass by their tag and resend nothing new):

(a) baseline — one thread, ``MlflowClient``: create the experiment and the runs,
    ``log_batch`` with 1000 metrics per call (params and tags in their own batch), from
    Metric objects already in memory (building them is not timed), end the runs;
(b) ``ff-sync`` — one library pass (``sync_once``) with ``sync.workers`` = each of
    ``--workers``, into fresh sync state: read, check, batch, send, record progress.

(a) and then (b) for each worker count make one round; ``--repeat`` rounds, each into fresh
destinations. It prints metrics/s and the ratio of each to the baseline of its round, then
the median and range over the rounds; the target is >= 1.5 for the parallel passes over a
server. ``--postgres`` does the same straight into PostgreSQL (``postgresql://``, a
throw-away cluster from tests/_services.py; target >= 4 with the default ``sync.workers``):
each measurement gets a fresh database copied from one MLflow migrated beforehand, so as for
the SQLite stores of bench_sync.py and the servers here, creating the schema (seconds of
MLflow's migrations) is not timed; ``--migrate-in-pass`` times it, as figures before
2026-12-03 did.

Server workers (``--server-workers``, default 2): the server is the bottleneck. One uvicorn
worker is one process, so however many clients send, its ORM work runs on one core (GIL);
parallel runs then only overlap the client's work and the round trips with it. Two workers use
both cores of a 2-core machine. The price: with several uvicorn workers every keep-alive
request pays ~44 ms more (see mlflow-facts), which slows the one-thread baseline most; so
also run ``--server-workers 1`` for the conservative ratio, and report both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.5  # parallel passes over an mlflow server
PG_TARGET_RATIO = 4.0  # PostgreSQL direct, default sync.workers
HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
PYTHON = sys.executable
sys.path.insert(0, str(HERE.parent))
from bench_sync import load_points  # noqa: E402  (the same spool-as-plain-data reader)

_WRITER = """
import sys
from formula_foundry.tracking import get_tracker
runs, keys, steps = (int(a) for a in sys.argv[1:4])
tracker = get_tracker()
for r in range(runs):
    tags = {f"tag{i}": f"v{i}" for i in range(5)}
    with tracker.start_run(run_name=f"bench-{r}", tags=tags) as run:
        run.log_params({f"param{i}": i * r for i in range(10)})
        t0 = 1_700_000_000_000 + r * 10_000_000
        for s in range(steps):
            for k in range(keys):
                run.log_metric(f"key{k}", (r + 1) * 0.001 * s + k, step=s, timestamp=t0 + s)
"""


def write_spool(spool: Path, runs: int, keys: int, steps: int) -> None:
    env = {**os.environ, "FF_SPOOL_ROOT": str(spool), "FF_DURABILITY": "write"}
    env.pop("FF_CONFIG", None)
    subprocess.run(
        [PYTHON, "-c", textwrap.dedent(_WRITER), str(runs), str(keys), str(steps)],
        env=env,
        check=True,
        cwd=spool.parent,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_server(base: Path, workers: int, backend: str | None = None) -> Iterator[str]:
    """A fresh ``mlflow server`` on loopback with its own store (SQLite unless ``backend``)."""
    base.mkdir(parents=True)
    port = _free_port()
    cmd = [
        str(Path(PYTHON).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend or f"sqlite:///{base / 'server.db'}",
        "--artifacts-destination",
        str(base / "artifacts"),
    ]
    with open(base / "server.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow's job runner (seven huey processes) serves no tracking request.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited; see {base / 'server.log'}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start; see {base / 'server.log'}")
            time.sleep(0.3)
        # The first request of a fresh store pays for lazy setup: not part of a measurement.
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments()
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def baseline(uri: str, runs: list[dict[str, Any]], artifact_dir: Path | None) -> tuple[float, int]:
    """One thread, MlflowClient.log_batch in 1000-metric batches; (seconds, metrics)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    prepared = [
        (
            r,
            [Metric(k, v, t, s) for k, v, t, s in r["metrics"]],
            [Param(k, str(v)) for k, v in r["params"].items()],
            [RunTag(k, str(v)) for k, v in r["tags"].items()],
        )
        for r in runs
    ]
    n = sum(len(m) for _, m, _, _ in prepared)
    start = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    location = str(artifact_dir) if artifact_dir is not None else None
    exp = client.create_experiment("baseline", artifact_location=location)
    for r, metrics, params, tags in prepared:
        run = client.create_run(exp, start_time=r["t"], run_name=r["name"])
        client.log_batch(run.info.run_id, params=params, tags=tags)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
        client.set_terminated(run.info.run_id)
    return time.perf_counter() - start, n


def ff_sync(uri: str, work: Path, spool: Path, workers: int) -> tuple[float, int, int]:
    """One library pass with ``sync.workers`` = ``workers``; (seconds, metrics, workers used)."""
    from formula_foundry.sync import load_sync_settings, sync_once

    os.environ.pop("FF_CONFIG", None)
    settings = load_sync_settings(None, tracking_uri=uri, spool_root=spool)
    settings = dataclasses.replace(
        settings,
        sync_state_dir=work / "sync",
        artifact_root=work / "artifacts",
        sync_workers=workers,
    )
    start = time.perf_counter()
    report = sync_once(settings)
    elapsed = time.perf_counter() - start
    if report.exit_code != 0:
        raise SystemExit(f"ff-sync pass failed: {report.summary()}\n{report.details()}")
    return elapsed, report.metrics, report.workers


def compare(
    label: str,
    destination: Callable[[Path], Any],
    work: Path,
    spool: Path,
    runs: list[dict[str, Any]],
    workers: list[int],
    artifact_dir: bool,
    repeat: int,
    quiet: bool,
) -> dict[str, Any]:
    """Rounds of the baseline then ff-sync passes, each into a fresh ``destination``."""
    out: dict[str, Any] = {"destination": label, "rounds": []}
    for i in range(repeat):
        row: dict[str, Any] = {}
        base = work / f"{label}-baseline-{i}"
        with destination(base) as uri:
            base_s, n = baseline(uri, runs, base / "artifacts" if artifact_dir else None)
        out["metrics"] = n
        row["baseline_s"] = round(base_s, 2)
        row["baseline_metrics_per_s"] = round(n / base_s)
        for w in workers:
            with destination(work / f"{label}-w{w}-{i}") as uri:
                secs, m, used = ff_sync(uri, work / f"{label}-state-w{w}-{i}", spool, w)
            if m != n:
                raise SystemExit(f"ff-sync (workers={w}) sent {m} metrics, the baseline {n}")
            row[f"workers_{w}"] = {
                "seconds": round(secs, 2),
                "metrics_per_s": round(n / secs),
                "ratio": round(base_s / secs, 2),
                "workers_used": used,
            }
        out["rounds"].append(row)
        if not quiet:
            print(f"{label} round {i + 1}: {row}", flush=True)
    rounds = out["rounds"]
    out["baseline_metrics_per_s"] = _spread([r["baseline_metrics_per_s"] for r in rounds])
    for w in workers:
        out[f"workers_{w}"] = {
            "metrics_per_s": _spread([r[f"workers_{w}"]["metrics_per_s"] for r in rounds]),
            "ratio": _spread([r[f"workers_{w}"]["ratio"] for r in rounds]),
            "workers_used": rounds[-1][f"workers_{w}"]["workers_used"],
        }
    return out


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"median": round(median, 2), "min": ordered[0], "max": ordered[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--workers", default="1,4,8", help="sync.workers values, comma-separated")
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    ap.add_argument("--postgres", action="store_true", help="also measure postgresql:// direct")
    ap.add_argument(
        "--server-backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the server's backend store (a team's server sits on PostgreSQL)",
    )
    ap.add_argument("--no-http", action="store_true", help="skip the mlflow server part")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (fresh destinations each)")
    ap.add_argument(
        "--migrate-in-pass",
        action="store_true",
        help="--postgres: empty databases, MLflow's migrations inside the timed passes",
    )
    ap.add_argument("--dir", type=Path, help="work folder (kept); default: a temporary one")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    work = Path(tempfile.mkdtemp(prefix="ff-bench-http-")) if args.dir is None else args.dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        spool = work / "runs"
        spool.mkdir()
        write_spool(spool, args.runs, args.keys, args.steps)
        runs = load_points(spool)

        sys.path.insert(0, str(REPO))
        from tests._services import create_database, migrated_template, postgres_cluster

        results: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            admin = None
            if args.postgres or args.server_backend == "postgresql":
                admin = stack.enter_context(postgres_cluster())

            @contextmanager
            def server(base: Path) -> Iterator[str]:
                backend = (
                    None
                    if admin is None or args.server_backend == "sqlite"
                    else (create_database(admin, "ffserver"))
                )
                with mlflow_server(base, args.server_workers, backend) as uri:
                    yield uri

            rounds = {"repeat": args.repeat, "quiet": args.json}
            if not args.no_http:
                label = f"http ({args.server_backend} backend)"
                results.append(compare(label, server, work, spool, runs, workers, False, **rounds))
                results[0]["server_workers"] = args.server_workers
                results[0]["target_ratio"] = TARGET_RATIO
            if args.postgres and admin is not None:
                pg_admin = admin
                template = (
                    None if args.migrate_in_pass else migrated_template(admin, work / "template")
                )

                @contextmanager
                def database(base: Path) -> Iterator[str]:
                    yield create_database(pg_admin, "ffbench", template=template)

                res = compare("postgresql", database, work, spool, runs, workers, True, **rounds)
                res["schema"] = "created in the pass" if template is None else "created untimed"
                res["target_ratio"] = PG_TARGET_RATIO
                results.append(res)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for res in results:
        extra = f", server --workers {res['server_workers']}" if "server_workers" in res else ""
        extra += f", schema {res['schema']}" if "schema" in res else ""
        print(
            f"{res['destination']}{extra}: {res['metrics']} metrics, {args.repeat} rounds; "
            f"baseline (1 thread, log_batch x1000): {res['baseline_metrics_per_s']} metrics/s; "
            f"target ratio >= {res['target_ratio']}"
        )
        for w in workers:
            r = res[f"workers_{w}"]
            print(
                f"  ff-sync workers={w} (used {r['workers_used']}): "
                f"{r['metrics_per_s']} metrics/s, ratio {r['ratio']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
