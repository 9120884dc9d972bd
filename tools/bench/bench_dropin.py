#!/usr/bin/env python3
"""Benchmark the MLflow drop-in (``spool:`` tracking URIs) against a store that does nothing.

Usage::

    python tools/bench/bench_dropin.py [--repeat 3] [--calls 10000] [--sqlite-calls 200]
                                       [--batches 100] [--points 1000000] [--get-runs 20000]
                                       [--quick] [--no-profile] [--dir DIR] [--json]

Every figure comes from a fresh interpreter per configuration and repetition (this script
spawns itself with ``--child``): building a spool store records PySpark as absent in
``sys.modules``, which would also speed up a do-nothing store measured later in the same
process. Configurations run in rounds (one of each per round, ``--repeat`` rounds) so a burst
of load on a shared machine touches all of them; each figure is the median of the rounds, with
its spread ((max - min) / median). Telemetry is off in every child (``MLFLOW_DISABLE_TELEMETRY``)
so the benchmark sends nothing anywhere; everything else is MLflow's defaults unless stated.

Stores: ``noop`` — an ``AbstractStore`` subclass registered under the ``noop`` scheme in the
child, whose writes do nothing and whose reads return one cached object; ``spool`` — the
drop-in (a fresh spool per child, default durability ``write``); ``sqlite`` — MLflow's SQL
store. Registry: ``default`` (none set: MLflow resolves one for every client it builds) or
``set`` (``mlflow.set_registry_uri(<the tracking URI>)`` before the run starts).

(a) fluent ``mlflow.log_metric(key, value, step=i)`` in an active run, µs per call;
(b) fluent ``mlflow.log_metrics({10 keys}, step=i)``, µs per call (and per metric);
(c) ``MlflowClient.log_batch`` of 1,000 metrics (10 keys x 100 steps, Metric objects built
    untimed), µs per metric — noop and spool;
(d) ``MlflowClient.get_run`` of the active run after 100 points, then (spool) after
    ``--points`` points logged through ``log_batch`` in chunks of 1,000 (same 10 keys); SQLite
    after 100 points for comparison; noop for reference.
Then (unless ``--no-profile``) cProfile of the spool ``log_metric``, ``log_metrics`` and
``log_batch`` paths and of ``log_metric`` on the do-nothing store under MLflow's defaults.

Goals (issue 12): through ``spool:`` under MLflow's defaults, fluent ``log_metric`` and
``log_metrics`` <= 1.1 x the do-nothing store with a registry URI set, <= 0.25 x
(``log_metric``) and <= 0.5 x (``log_metrics``) the do-nothing store under defaults;
``log_batch`` of 1,000 <= 1.5 x the do-nothing store; ``get_run`` after 1,000,000 points
<= 1.2 x after 100, and less than ``get_run`` from SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
KEYS = 10
STEPS_PER_BATCH = 100  # a log_batch of KEYS x STEPS_PER_BATCH = 1,000 metrics
T0 = 1_700_000_000_000

GOAL_VS_NOOP_REGISTRY = 1.1
GOAL_LOG_METRIC_VS_NOOP_DEFAULT = 0.25
GOAL_LOG_METRICS_VS_NOOP_DEFAULT = 0.5
GOAL_LOG_BATCH = 1.5
GOAL_GET_RUN_GROWTH = 1.2

# Variables that would change where a child logs or how its store is configured.
CLEARED_ENV = (
    "FF_CONFIG",
    "FF_SPOOL_ROOT",
    "FF_DURABILITY",
    "FF_TRACKING_DISABLED",
    "FF_RUN_ID",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_ENABLE_ASYNC_LOGGING",
)


# ---------------------------------------------------------------------------------------------
# Child side: one configuration, one task, figures printed as one JSON line.


def _install_noop_store() -> None:
    """Register the do-nothing tracking (and model-registry) store under ``noop:``."""
    from mlflow.entities import Experiment, LifecycleStage, Run, RunData, RunInfo
    from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryStore
    from mlflow.store.tracking.abstract_store import AbstractStore
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    experiment = Experiment("0", "Default", "noop:/artifacts", LifecycleStage.ACTIVE)

    class NoopStore(AbstractStore):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.run: Run | None = None

        def get_experiment(self, experiment_id: str) -> Experiment:
            return experiment

        def get_experiment_by_name(self, experiment_name: str) -> Experiment:
            return experiment

        def create_experiment(self, *args: Any, **kwargs: Any) -> str:
            return "0"

        def create_run(self, experiment_id, user_id, start_time, tags, run_name):  # type: ignore[no-untyped-def]
            info = RunInfo(
                run_id="0" * 32,
                experiment_id=experiment_id,
                user_id=user_id,
                status="RUNNING",
                start_time=start_time,
                end_time=None,
                lifecycle_stage=LifecycleStage.ACTIVE,
                artifact_uri="noop:/artifacts",
                run_name=run_name or "noop",
            )
            self.run = Run(info, RunData(tags=list(tags or ())))
            return self.run

        def get_run(self, run_id: str) -> Run:
            assert self.run is not None
            return self.run

        def update_run_info(self, run_id, run_status, end_time, run_name):  # type: ignore[no-untyped-def]
            assert self.run is not None
            return self.run.info

        def log_batch(self, run_id, metrics, params, tags):  # type: ignore[no-untyped-def]
            return None

        def log_inputs(self, *args: Any, **kwargs: Any) -> None:
            return None

    class NoopRegistry(RegistryStore):  # type: ignore[misc]
        pass

    NoopRegistry.__abstractmethods__ = frozenset()
    _tracking_store_registry.register("noop", lambda store_uri=None, artifact_uri=None: NoopStore())
    _get_store_registry().register("noop", lambda store_uri=None, tracking_uri=None: NoopRegistry())


def _batch(first_step: int) -> list[Any]:
    from mlflow.entities import Metric

    return [
        Metric(f"layer{k}/loss", 0.5 + k + s * 1e-6, T0 + s, s)
        for s in range(first_step, first_step + STEPS_PER_BATCH)
        for k in range(KEYS)
    ]


def _fluent(calls: int) -> dict[str, float]:
    import mlflow

    metrics = {f"layer{k}/loss": 0.5 + k for k in range(KEYS)}
    warm = max(calls // 20, 5)
    with mlflow.start_run():
        log_metric, log_metrics = mlflow.log_metric, mlflow.log_metrics
        for i in range(warm):
            log_metric("loss", 0.5, step=i)
        start = time.perf_counter()
        for i in range(calls):
            log_metric("loss", 0.5, step=i)
        per_call = (time.perf_counter() - start) / calls * 1e6
        for i in range(warm):
            log_metrics(metrics, step=i)
        start = time.perf_counter()
        for i in range(calls):
            log_metrics(metrics, step=i)
        per_call10 = (time.perf_counter() - start) / calls * 1e6
    return {"log_metric_us": per_call, "log_metrics10_us": per_call10}


def _log_batch(batches: int) -> dict[str, float]:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=_batch(0))  # warm-up
        spent = 0.0
        for b in range(1, batches + 1):
            metrics = _batch(b * STEPS_PER_BATCH)
            start = time.perf_counter()
            client.log_batch(run_id, metrics=metrics)
            spent += time.perf_counter() - start
    return {"log_batch1000_per_metric_us": spent / (batches * KEYS * STEPS_PER_BATCH) * 1e6}


def _time_get_run(client: Any, run_id: str, calls: int) -> float:
    get_run = client.get_run
    for _ in range(max(calls // 20, 5)):
        get_run(run_id)
    start = time.perf_counter()
    for _ in range(calls):
        get_run(run_id)
    return (time.perf_counter() - start) / calls * 1e6


def _get_run(calls: int, points: int) -> dict[str, float]:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    fig: dict[str, float] = {}
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=_batch(0)[:100])  # 100 points: 10 keys x 10 steps
        fig["get_run_100_us"] = _time_get_run(client, run_id, calls)
        if points > 100:
            logged, step, spent = 100, 10, 0.0
            while logged < points:
                metrics = _batch(step)[: points - logged]
                start = time.perf_counter()
                client.log_batch(run_id, metrics=metrics)
                spent += time.perf_counter() - start
                logged += len(metrics)
                step += STEPS_PER_BATCH
            fig["fill_per_metric_us"] = spent / (points - 100) * 1e6
            fig["get_run_many_us"] = _time_get_run(client, run_id, calls)
            latest = client.get_run(run_id).data.metrics
            if len(latest) != KEYS:
                raise RuntimeError(f"get_run shows {len(latest)} metrics, expected {KEYS}")
    return fig


def _top(stats: Any, total: float, sort: int, limit: int) -> list[str]:
    rows = sorted(stats.stats.items(), key=lambda item: item[1][sort], reverse=True)
    out = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in rows:
        if "bench_dropin" in filename or func == "<built-in method builtins.exec>":
            continue
        short = filename
        for marker in ("site-packages/", "src/", "lib/python3"):
            if marker in filename:
                short = filename.split(marker, 1)[1]
                break
        where = f"{func} ({short}:{line})" if line else func
        out.append(f"{100 * tt / total:5.1f}% self {100 * ct / total:5.1f}% cum {nc:>8}  {where}")
        if len(out) == limit:
            break
    return out


def _profile(kind: str, calls: int, limit: int) -> dict[str, Any]:
    """cProfile of one path; the top entries by own time and by cumulative time."""
    import cProfile
    import pstats

    import mlflow
    from mlflow import MlflowClient

    metrics = {f"layer{k}/loss": 0.5 + k for k in range(KEYS)}
    client = MlflowClient()
    profiler = cProfile.Profile()
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_metric("loss", 0.5)
        mlflow.log_metrics(metrics)
        client.log_batch(run_id, metrics=_batch(0))
        batches = [_batch(b * STEPS_PER_BATCH) for b in range(1, max(calls // 100, 2) + 1)]
        start = time.perf_counter()
        profiler.enable()
        if kind == "log_metric":
            for i in range(calls):
                mlflow.log_metric("loss", 0.5, step=i)
        elif kind == "log_metrics":
            for i in range(calls):
                mlflow.log_metrics(metrics, step=i)
        else:
            for batch in batches:
                client.log_batch(run_id, metrics=batch)
        profiler.disable()
        wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    n = calls if kind != "log_batch" else len(batches) * KEYS * STEPS_PER_BATCH
    return {
        "profiled_us_per_unit": wall / n * 1e6,
        "by_self": _top(stats, total, 2, limit),
        "by_cum": _top(stats, total, 3, limit),
    }


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    import mlflow

    _install_noop_store()
    if cfg["registry"] == "set":
        mlflow.set_registry_uri(mlflow.get_tracking_uri())
    task = cfg["task"]
    if task == "fluent":
        return _fluent(cfg["calls"])
    if task == "log_batch":
        return _log_batch(cfg["batches"])
    if task == "get_run":
        return _get_run(cfg["calls"], cfg["points"])
    return _profile(cfg["kind"], cfg["calls"], cfg["limit"])


# ---------------------------------------------------------------------------------------------
# Parent side.


def run_child(folder: Path, store: str, registry: str, task: dict[str, Any]) -> dict[str, Any]:
    tag = f"{store}-{registry}-{task['task']}-{time.monotonic_ns()}"
    if store == "spool":
        uri = f"spool://{(folder / tag).as_posix()}"
    elif store == "sqlite":
        uri = f"sqlite:///{(folder / f'{tag}.db').as_posix()}"
    else:
        uri = "noop://bench"
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    cfg = {"registry": registry, **task}
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--child", json.dumps(cfg)],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(folder / tag, ignore_errors=True)
        for leftover in folder.glob(f"{tag}.db*"):
            leftover.unlink()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"child {store}/{registry}/{task} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def summary(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (fresh processes each)")
    parser.add_argument("--calls", type=int, default=10_000, help="fluent calls per child")
    parser.add_argument("--sqlite-calls", type=int, default=200, help="fluent calls into SQLite")
    parser.add_argument("--batches", type=int, default=100, help="log_batch calls of 1,000")
    parser.add_argument("--points", type=int, default=1_000_000, help="points before get_run")
    parser.add_argument("--get-runs", type=int, default=20_000, help="get_run calls timed")
    parser.add_argument("--sqlite-get-runs", type=int, default=1_000)
    parser.add_argument("--profile-calls", type=int, default=3_000)
    parser.add_argument("--profile-lines", type=int, default=12)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, few calls")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.repeat, args.calls, args.sqlite_calls, args.batches = 1, 1_000, 20, 10
        args.points, args.get_runs, args.sqlite_get_runs = 20_000, 2_000, 100
        args.profile_calls = 300

    fluent = {"task": "fluent", "calls": args.calls}
    configs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "noop_default": ("noop", "default", fluent),
        "noop_registry": ("noop", "set", fluent),
        "spool_default": ("spool", "default", fluent),
        "spool_registry": ("spool", "set", fluent),
        "sqlite_default": ("sqlite", "default", {"task": "fluent", "calls": args.sqlite_calls}),
        "batch_noop": ("noop", "default", {"task": "log_batch", "batches": args.batches}),
        "batch_spool": ("spool", "default", {"task": "log_batch", "batches": args.batches}),
        "get_run_noop": ("noop", "default", {"task": "get_run", "calls": args.get_runs, "points": 100}),
        "get_run_spool": (
            "spool",
            "default",
            {"task": "get_run", "calls": args.get_runs, "points": args.points},
        ),
        "get_run_sqlite": (
            "sqlite",
            "default",
            {"task": "get_run", "calls": args.sqlite_get_runs, "points": 100},
        ),
    }
    raw: dict[str, list[float]] = {}
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ff-bench-dropin-", dir=args.dir) as tmp:
        folder = Path(tmp)
        for r in range(args.repeat):
            for name, (store, registry, task) in configs.items():
                print(f"round {r + 1}/{args.repeat}: {name}", file=sys.stderr, flush=True)
                for key, value in run_child(folder, store, registry, task).items():
                    raw.setdefault(f"{name}.{key}", []).append(value)
        if not args.no_profile:
            for label, store, kind in (
                ("spool log_metric", "spool", "log_metric"),
                ("spool log_metrics (10 keys)", "spool", "log_metrics"),
                ("spool MlflowClient.log_batch (1,000)", "spool", "log_batch"),
                ("noop log_metric, MLflow defaults", "noop", "log_metric"),
            ):
                print(f"profile: {label}", file=sys.stderr, flush=True)
                task = {
                    "task": "profile",
                    "kind": kind,
                    "calls": args.profile_calls,
                    "limit": args.profile_lines,
                }
                profiles[label] = run_child(folder, store, "default", task)

    fig = {name: summary(values) for name, values in raw.items()}
    med = {name: s["median"] for name, s in fig.items()}

    def line(label: str, key: str, unit: str = "µs/call", scale: float = 1.0) -> None:
        s = fig[key]
        print(
            f"{label:<44} {s['median'] / scale:9.2f} {unit:<10} "
            f"[{s['min'] / scale:.2f} .. {s['max'] / scale:.2f}, spread {100 * s['spread']:.0f}%]"
        )

    print(
        f"python {sys.version.split()[0]}, mlflow {_mlflow_version()}, {args.repeat} rounds "
        f"(median [min .. max, spread]), {args.calls} fluent calls ({args.sqlite_calls} into "
        f"SQLite), {args.batches} x log_batch(1,000), get_run after {args.points} points"
    )
    print("(a) fluent log_metric")
    for name in ("noop_default", "noop_registry", "spool_default", "spool_registry", "sqlite_default"):
        line(f"    {name}", f"{name}.log_metric_us")
    print("(b) fluent log_metrics, 10 keys")
    for name in ("noop_default", "noop_registry", "spool_default", "spool_registry", "sqlite_default"):
        line(f"    {name}", f"{name}.log_metrics10_us")
        line(f"    {name} per metric", f"{name}.log_metrics10_us", "µs/metric", KEYS)
    print("(c) MlflowClient.log_batch, 1,000 metrics")
    line("    noop", "batch_noop.log_batch1000_per_metric_us", "µs/metric")
    line("    spool", "batch_spool.log_batch1000_per_metric_us", "µs/metric")
    print("(d) MlflowClient.get_run of the active run")
    line("    noop (cached object)", "get_run_noop.get_run_100_us")
    line("    spool after 100 points", "get_run_spool.get_run_100_us")
    if "get_run_spool.get_run_many_us" in fig:
        line(f"    spool after {args.points} points", "get_run_spool.get_run_many_us")
        line("    (filling: log_batch per metric)", "get_run_spool.fill_per_metric_us", "µs/metric")
    line("    sqlite after 100 points", "get_run_sqlite.get_run_100_us")

    def ratio(label: str, num: str, den: str, goal: float | None, below: bool = False) -> None:
        value = med[num] / med[den]
        if goal is None:
            verdict = "(info)"
        else:
            ok = value < goal if below else value <= goal
            verdict = f"[{'<' if below else '<='} {goal:g}: {'ok' if ok else 'MISSED'}]"
        fig[f"ratio.{label}"] = {"median": value}
        print(f"{label:<58} {value:7.3f} x  {verdict}")

    print("Goals (ratios of medians)")
    lm, lm10 = "log_metric_us", "log_metrics10_us"
    ratio("log_metric spool / noop+registry", f"spool_default.{lm}", f"noop_registry.{lm}", 1.1)
    ratio("log_metrics spool / noop+registry", f"spool_default.{lm10}", f"noop_registry.{lm10}", 1.1)
    ratio(
        "log_metric spool / noop (defaults)",
        f"spool_default.{lm}",
        f"noop_default.{lm}",
        GOAL_LOG_METRIC_VS_NOOP_DEFAULT,
    )
    ratio(
        "log_metrics spool / noop (defaults)",
        f"spool_default.{lm10}",
        f"noop_default.{lm10}",
        GOAL_LOG_METRICS_VS_NOOP_DEFAULT,
    )
    ratio(
        "log_batch(1,000) spool / noop",
        "batch_spool.log_batch1000_per_metric_us",
        "batch_noop.log_batch1000_per_metric_us",
        GOAL_LOG_BATCH,
    )
    if "get_run_spool.get_run_many_us" in fig:
        ratio(
            f"get_run spool after {args.points} / after 100 points",
            "get_run_spool.get_run_many_us",
            "get_run_spool.get_run_100_us",
            GOAL_GET_RUN_GROWTH,
        )
        ratio(
            f"get_run spool after {args.points} / sqlite",
            "get_run_spool.get_run_many_us",
            "get_run_sqlite.get_run_100_us",
            1.0,
            below=True,
        )
    ratio("log_metric spool+registry / noop+registry", f"spool_registry.{lm}", f"noop_registry.{lm}", None)
    ratio("log_metrics spool+registry / noop+registry", f"spool_registry.{lm10}", f"noop_registry.{lm10}", None)
    ratio("log_metric noop (defaults) / noop+registry", f"noop_default.{lm}", f"noop_registry.{lm}", None)
    ratio("log_metric sqlite / noop (defaults)", f"sqlite_default.{lm}", f"noop_default.{lm}", None)

    for label, prof in profiles.items():
        unit = "metric" if "log_batch" in label else "call"
        print(f"profile: {label} ({prof['profiled_us_per_unit']:.1f} µs/{unit} under cProfile)")
        print("  by own time:")
        for row in prof["by_self"]:
            print(f"    {row}")
        print("  by cumulative time:")
        for row in prof["by_cum"]:
            print(f"    {row}")
    if args.json:
        print(json.dumps({"figures": fig, "raw": raw, "profiles": profiles}, sort_keys=True))
    return 0


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow-skinny") if _has("mlflow-skinny") else version("mlflow")


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
