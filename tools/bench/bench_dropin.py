#!/usr/bin/env python3
"""Benchmark the MLflow drop-in (``spool:`` tracking URIs) against a store that does nothing.

Usage::

    python tools/bench/bench_dropin.py [--repeat 3] [--blocks 5] [--calls 4000]
                                       [--sqlite-calls 60] [--batches 50] [--points 1000000]
                                       [--get-runs 10000] [--quick] [--no-profile]
                                       [--ablate ROUNDS] [--dir DIR] [--json]

Each configuration runs in a fresh interpreter (this script spawns itself with ``--child``),
once per round, ``--repeat`` rounds: building a spool store records PySpark as absent in
``sys.modules``, which would also speed up a do-nothing store measured later in the same
process. A child times each loop in ``--blocks`` blocks and keeps its best block, in wall
time and in CPU time (``time.process_time``: user + system, all threads — what the call
costs even while other processes share the cores); a figure is the median over the rounds,
shown with [min .. max, spread = (max - min) / median]. Ratios are ratios of medians. Telemetry
is off in every child (``MLFLOW_DISABLE_TELEMETRY``): the benchmark sends nothing anywhere;
everything else is MLflow's defaults unless stated.

Stores: ``noop`` — an ``AbstractStore`` subclass registered under the ``noop`` scheme in the
child, whose writes do nothing and whose reads return one cached object; ``spool`` — the
drop-in (a fresh spool per child, default durability ``write``); ``sqlite`` — MLflow's SQL
store. Registry: ``default`` (none set: MLflow resolves one for every client it builds) or
``set`` (``mlflow.set_registry_uri(<the tracking URI>)`` before the run starts).

(a) fluent ``mlflow.log_metric(key, value, step=i)`` in an active run, µs per call;
(b) fluent ``mlflow.log_metrics({10 keys}, step=i)``, µs per call; then its parts, timed in
    the same child: the store's own ``log_batch`` of 1 and of 10 metrics (a rising step per
    call, as the fluent loops), and one registry-URI resolution (the fluent calls build two
    ``MlflowClient``, one each);
(c) ``MlflowClient.log_batch`` of 1,000 metrics (10 keys x 100 steps, Metric objects built
    untimed), µs per metric — noop and spool;
(d) ``MlflowClient.get_run`` of an active run holding 100 points and (spool, in a child of
    its own) of a nested active run holding ``--points`` points logged with ``log_batch`` in
    chunks of 1,000 (same 10 keys), the two timed in alternating blocks; SQLite after 100
    points for comparison; noop for reference.
Then (unless ``--no-profile``) cProfile of the spool ``log_metric``, ``log_metrics`` and
``log_batch`` paths and of ``log_metric`` on the do-nothing store under MLflow's defaults.
``--ablate ROUNDS``: in one child, fluent ``log_metric`` / ``log_metrics`` through the
do-nothing store and through stripped copies of the spool write path (only the one
``os.write``; + the line's framing; + the writer's lock and sequence; the whole store), in
alternating blocks, best of ROUNDS: what each part the guarantees require costs inside a
fluent call, against the goal's 10 %.
``--quick`` is a smoke run (one round, few calls, 20,000 points), not a measurement.

Goals (issue 12): through ``spool:`` under MLflow's defaults, fluent ``log_metric`` and
``log_metrics`` <= 1.1 x the do-nothing store with a registry URI set, <= 0.25 x
(``log_metric``) and <= 0.5 x (``log_metrics``) the do-nothing store under defaults;
``log_batch`` of 1,000 <= 1.5 x the do-nothing store; ``get_run`` after 1,000,000 points
<= 1.2 x after 100, and less than ``get_run`` from SQLite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def _blocks(loop: Callable[[int, int], object], calls: int, blocks: int) -> tuple[float, float]:
    """µs per iteration of ``loop(start, stop)`` over ``calls`` iterations cut into ``blocks``:
    the best block's wall time and the best block's CPU time (user + system, all threads)."""
    per = max(calls // blocks, 1)
    gc.collect()  # no collection of the import-time heap pending on the first block
    loop(-max(per // 5, 5), 0)  # warm-up
    walls, cpus = [], []
    for b in range(blocks):
        w0, c0 = time.perf_counter(), time.process_time()
        loop(b * per, (b + 1) * per)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls) / per * 1e6, min(cpus) / per * 1e6


def _fluent(calls: int, blocks: int) -> dict[str, float]:
    import mlflow

    metrics = {f"layer{k}/loss": 0.5 + k for k in range(KEYS)}
    log_metric, log_metrics = mlflow.log_metric, mlflow.log_metrics

    def one(start: int, stop: int) -> None:
        for i in range(start, stop):
            log_metric("loss", 0.5, step=i)

    def ten(start: int, stop: int) -> None:
        for i in range(start, stop):
            log_metrics(metrics, step=i)

    fig: dict[str, float] = {}
    with mlflow.start_run() as run:
        fig["log_metric_us"], fig["log_metric_cpu_us"] = _blocks(one, calls, blocks)
        fig["log_metrics10_us"], fig["log_metrics10_cpu_us"] = _blocks(ten, calls, blocks)
        fig.update(_parts(run.info.run_id, calls, blocks))
    return fig


def _parts(run_id: str, calls: int, blocks: int) -> dict[str, float]:
    """What a fluent call is made of: the store's own work, and one registry-URI resolution
    (MLflow does one per ``MlflowClient`` it builds; the fluent calls build two)."""
    from mlflow.entities import Metric
    from mlflow.tracking._model_registry.utils import _resolve_registry_uri
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store()
    # A rising step per call, as the fluent loops log them (built untimed; offset past the
    # fluent loops' steps and the warm-up's negative indices).
    first = 2 * calls
    ones = [[Metric("loss", 0.5, T0, first + i)] for i in range(2 * calls)]
    tens = [
        [Metric(f"layer{k}/loss", 0.5 + k, T0, first + i) for k in range(KEYS)]
        for i in range(2 * calls)
    ]

    def store_one(start: int, stop: int) -> None:
        for i in range(start, stop):
            store.log_batch(run_id, ones[calls + i], [], [])

    def store_ten(start: int, stop: int) -> None:
        for i in range(start, stop):
            store.log_batch(run_id, tens[calls + i], [], [])

    def resolve(start: int, stop: int) -> None:
        for _ in range(start, stop):
            _resolve_registry_uri()

    fig: dict[str, float] = {}
    fig["store_log_metric_us"], fig["store_log_metric_cpu_us"] = _blocks(store_one, calls, blocks)
    fig["store_log_batch10_us"], fig["store_log_batch10_cpu_us"] = _blocks(store_ten, calls, blocks)
    fig["resolve_registry_us"], fig["resolve_registry_cpu_us"] = _blocks(resolve, calls, blocks)
    return fig


def _log_batch(batches: int, blocks: int) -> dict[str, float]:
    """µs per metric of ``MlflowClient.log_batch`` with 1,000 metrics (built untimed), and of
    the store's own ``log_batch`` of the same metrics (its part of that call)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _get_store

    client, store = MlflowClient(), _get_store()
    per = max(batches // blocks, 1)
    n = per * KEYS * STEPS_PER_BATCH
    fig: dict[str, float] = {}
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        step = 0
        for name, call in (
            ("log_batch1000", lambda batch: client.log_batch(run_id, metrics=batch)),
            ("store_log_batch1000", lambda batch: store.log_batch(run_id, batch, [], [])),
        ):
            walls, cpus = [], []
            gc.collect()
            for b in range(-1, blocks):  # -1: warm-up
                prepared = []
                for _ in range(1 if b < 0 else per):
                    prepared.append(_batch(step))
                    step += STEPS_PER_BATCH
                w0, c0 = time.perf_counter(), time.process_time()
                for batch in prepared:
                    call(batch)
                if b >= 0:
                    walls.append(time.perf_counter() - w0)
                    cpus.append(time.process_time() - c0)
                del batch, prepared  # freed here, not in the next block's timed loop
            fig[f"{name}_per_metric_us"] = min(walls) / n * 1e6
            fig[f"{name}_per_metric_cpu_us"] = min(cpus) / n * 1e6
    return fig


def _get_run(calls: int, points: int, blocks: int) -> dict[str, float]:
    """``get_run`` of an active run holding 100 points and, if ``points`` > 100, of a nested
    active run holding ``points`` points, timed in alternating short blocks (a burst of load
    on the machine then hits both), best block of each."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    get_run = client.get_run

    def timer(run_id: str) -> Callable[[int, int], None]:
        def loop(start: int, stop: int) -> None:
            for _ in range(start, stop):
                get_run(run_id)

        return loop

    fig: dict[str, float] = {}
    with mlflow.start_run() as small:
        client.log_batch(small.info.run_id, metrics=_batch(0)[:100])  # 10 keys x 10 steps
        loops = {"get_run_100": timer(small.info.run_id)}
        with mlflow.start_run(nested=True) as big:
            if points > 100:
                logged, step, spent = 0, 0, 0.0
                while logged < points:
                    metrics = _batch(step)[: points - logged]
                    start = time.perf_counter()
                    client.log_batch(big.info.run_id, metrics=metrics)
                    spent += time.perf_counter() - start
                    logged += len(metrics)
                    step += STEPS_PER_BATCH
                fig["fill_per_metric_us"] = spent / points * 1e6
                loops["get_run_many"] = timer(big.info.run_id)
                latest = get_run(big.info.run_id).data.metrics
                if len(latest) != KEYS:
                    raise RuntimeError(f"get_run shows {len(latest)} metrics, expected {KEYS}")
            alternations = 4 * blocks  # short blocks, many of them: a steadier best
            per = max(calls // alternations, 1)
            best = {name: [float("inf"), float("inf")] for name in loops}
            gc.collect()
            for _ in range(alternations):
                for name, loop in loops.items():
                    wall, cpu = _blocks(loop, per, 1)
                    best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            for name, (wall, cpu) in best.items():
                fig[f"{name}_us"], fig[f"{name}_cpu_us"] = wall, cpu
    return fig


def _ablate(calls: int, rounds: int) -> dict[str, Any]:
    """Fluent ``log_metric`` / ``log_metrics`` through the do-nothing store and through
    stripped copies of the spool store's write path, in one process (registry URI resolved, as
    the spool store does), alternating blocks of ``calls``, best of ``rounds``: how much of what
    a spool call adds is the one ``os.write``, the line's framing, the writer, the rest."""
    import zlib

    import mlflow
    import orjson

    from formula_foundry.dropin import store as spool_store
    from formula_foundry.tracking.events import CHECKSUM_TAIL, METRIC_HEAD
    from formula_foundry.tracking.spool_writer import SegmentWriter

    cls = spool_store.SpoolStore
    real = {"log_metric": cls.log_metric, "log_metrics": cls.log_batch}
    metrics = {f"layer{k}/loss": 0.5 + k for k in range(KEYS)}
    spool_uri = mlflow.get_tracking_uri()
    # Lines of the real ones' length, written to a file outside the spool.
    fd = os.open("ablate.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    scratch = SegmentWriter(Path.cwd() / "ablate-spool", "ablate")
    dumps, crc32, write = orjson.dumps, zlib.crc32, os.write
    line1 = CHECKSUM_TAIL % (METRIC_HEAD % (99_999, T0, 99_999, b'"loss"', b"0.5"), 0)
    head10 = b'{"v":1,"s":99999,"t":%d,"k":"metrics","step":99999,"d":%b' % (T0, dumps(metrics))
    line10 = CHECKSUM_TAIL % (head10, 0)

    def one_write(self: Any, run_id: str, metric: Any) -> None:
        write(fd, line1)

    def one_write10(self: Any, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        write(fd, line10)

    def framed(self: Any, run_id: str, m: Any) -> None:
        # The fields as the spool store reads them (MLflow's Metric keeps them in _key, ...).
        head = METRIC_HEAD % (
            scratch.last_seq + 1,
            m._timestamp,
            m._step,
            b'"loss"',
            dumps(m._value),
        )
        write(fd, CHECKSUM_TAIL % (head, crc32(head)))

    def writer(self: Any, run_id: str, m: Any) -> None:
        scratch.append_metric(m._timestamp, m._step, b'"loss"', dumps(m._value))

    def read_points(self: Any, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        spool_store._one_group(metrics)
        write(fd, line10)

    def read_and_write(self: Any, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        t, s, d = spool_store._one_group(metrics)  # type: ignore[misc]
        scratch.append_metric_events([(t, s, dumps(d))])

    variants: dict[str, dict[str, Any]] = {
        "log_metric": {
            "noop": None,
            "one os.write": one_write,
            "+ framing (value, head, crc)": framed,
            "+ writer (lock, sequence)": writer,
            "spool store": real["log_metric"],
        },
        "log_metrics": {
            "noop": None,
            "one os.write": one_write10,
            "+ reading the 10 points": read_points,
            "+ framing, writer": read_and_write,
            "spool store": real["log_metrics"],
        },
    }
    fig: dict[str, Any] = {}
    with mlflow.start_run():
        mlflow.log_metric("loss", 0.5)
        mlflow.log_metrics(metrics)  # the keys are known, as in a training loop
        mlflow.set_tracking_uri("noop://bench")
        mlflow.MlflowClient()._tracking_client.store.create_run("0", "bench", T0, [], "noop")
        step = 0
        for kind, table in variants.items():
            best = {name: float("inf") for name in table}
            gc.collect()
            for _ in range(rounds):
                for name, method in table.items():
                    mlflow.set_tracking_uri("noop://bench" if method is None else spool_uri)
                    if method is not None:
                        setattr(cls, "log_metric" if kind == "log_metric" else "log_batch", method)
                    start = time.perf_counter()
                    if kind == "log_metric":
                        for i in range(step, step + calls):
                            mlflow.log_metric("loss", 0.5, step=i)
                    else:
                        for i in range(step, step + calls):
                            mlflow.log_metrics(metrics, step=i)
                    best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
                    step += calls
            setattr(cls, "log_metric", real["log_metric"])  # noqa: B010 - a method, restored
            setattr(cls, "log_batch", real["log_metrics"])  # noqa: B010
            fig[kind] = best
        mlflow.set_tracking_uri(spool_uri)
    os.close(fd)
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
    if "profile" in cfg:
        return _profile(cfg["profile"], cfg["calls"], cfg["limit"])
    if "ablate" in cfg:
        return _ablate(cfg["calls"], cfg["ablate"])
    fig: dict[str, Any] = {}
    blocks = cfg["blocks"]
    for task in cfg["tasks"]:  # in this order, one after the other, in this process
        if task["task"] == "fluent":
            fig.update(_fluent(task["calls"], blocks))
        elif task["task"] == "log_batch":
            fig.update(_log_batch(task["batches"], blocks))
        else:
            fig.update(_get_run(task["calls"], task["points"], blocks))
    return fig


# ---------------------------------------------------------------------------------------------
# Parent side.


def run_child(folder: Path, store: str, registry: str, task: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its figures."""
    tag = f"{store}-{registry}-{time.monotonic_ns()}"
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
    spread = (max(values) - min(values)) / med if med else 0.0
    return {"median": med, "min": min(values), "max": max(values), "spread": spread}


def configurations(args: argparse.Namespace) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (store, registry, what the child measures) of every child a round runs.

    A child measures its tasks one after the other; the million-point run gets a child of
    its own so that the other figures come from a small process."""
    fluent = {"task": "fluent", "calls": args.calls}
    batch = {"task": "log_batch", "batches": args.batches}

    def get_run(calls: int, points: int) -> dict[str, Any]:
        return {"task": "get_run", "calls": calls, "points": points}

    def tasks(*items: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": list(items), "blocks": args.blocks}

    sqlite_fluent = {"task": "fluent", "calls": args.sqlite_calls}
    return {
        "noop_default": ("noop", "default", tasks(fluent, batch, get_run(args.get_runs, 100))),
        "noop_registry": ("noop", "set", tasks(fluent)),
        "spool_default": ("spool", "default", tasks(fluent, batch)),
        "spool_registry": ("spool", "set", tasks(fluent)),
        "sqlite_default": (
            "sqlite",
            "default",
            tasks(sqlite_fluent, get_run(args.sqlite_get_runs, 100)),
        ),
        "spool_get_run": ("spool", "default", tasks(get_run(args.get_runs, args.points))),
    }


PROFILES = (
    ("spool log_metric (MLflow defaults)", "spool", "log_metric"),
    ("spool log_metrics, 10 keys (MLflow defaults)", "spool", "log_metrics"),
    ("spool MlflowClient.log_batch (1,000)", "spool", "log_batch"),
    ("noop log_metric (MLflow defaults)", "noop", "log_metric"),
)
FLUENT = ("noop_default", "noop_registry", "spool_default", "spool_registry", "sqlite_default")


def report(
    args: argparse.Namespace, fig: dict[str, dict[str, float]], profiles: dict[str, Any]
) -> None:
    def show(label: str, key: str, unit: str = "µs/call", scale: float = 1.0) -> None:
        s, cpu = fig[key], fig.get(key.replace("_us", "_cpu_us"))
        text = (
            f"  {label:<34} {s['median'] / scale:9.2f} {unit:<9} "
            f"[{s['min'] / scale:.2f} .. {s['max'] / scale:.2f}, {100 * s['spread']:3.0f}%]"
        )
        if cpu is not None and key != key.replace("_us", "_cpu_us"):
            text += f"  cpu {cpu['median'] / scale:9.2f} [{100 * cpu['spread']:3.0f}%]"
        print(text)

    print(
        f"python {sys.version.split()[0]}, mlflow {_mlflow_version()}; medians of {args.repeat} "
        f"fresh processes [min .. max, spread] of each one's best of {args.blocks} blocks; wall "
        f"and CPU time. {args.calls} fluent calls ({args.sqlite_calls} into SQLite), "
        f"{args.batches} x log_batch(1,000), get_run after {args.points} points"
    )
    print("(a) fluent mlflow.log_metric")
    for name in FLUENT:
        show(name, f"{name}.log_metric_us")
    print("(b) fluent mlflow.log_metrics, 10 keys (per call; /10 per metric)")
    for name in FLUENT:
        show(name, f"{name}.log_metrics10_us")
    print("    parts: the store alone (log_batch of 1 / 10), one registry-URI resolution")
    for name in FLUENT:
        show(f"{name} store, 1 metric", f"{name}.store_log_metric_us")
        show(f"{name} store, 10 metrics", f"{name}.store_log_batch10_us")
        show(f"{name} resolve registry", f"{name}.resolve_registry_us")
    print("(c) MlflowClient.log_batch, 1,000 metrics")
    show("noop", "noop_default.log_batch1000_per_metric_us", "µs/metric")
    show("spool", "spool_default.log_batch1000_per_metric_us", "µs/metric")
    show("noop, the store alone", "noop_default.store_log_batch1000_per_metric_us", "µs/metric")
    show("spool, the store alone", "spool_default.store_log_batch1000_per_metric_us", "µs/metric")
    print("(d) MlflowClient.get_run of the active run")
    show("noop (cached object)", "noop_default.get_run_100_us")
    show("spool after 100 points", "spool_get_run.get_run_100_us")
    many = "spool_get_run.get_run_many_us" in fig
    if many:
        show(f"spool after {args.points} points", "spool_get_run.get_run_many_us")
        show("(filling it: log_batch)", "spool_get_run.fill_per_metric_us", "µs/metric")
    show("sqlite after 100 points", "sqlite_default.get_run_100_us")

    print("Goals (ratios of medians: wall, CPU)")

    def ratio(label: str, num: str, den: str, goal: float | None, below: bool = False) -> None:
        values = []
        for suffix in ("_us", "_cpu_us"):
            n, d = fig.get(num.replace("_us", suffix)), fig.get(den.replace("_us", suffix))
            if n is not None and d is not None:
                values.append(n["median"] / d["median"])
        fig[f"ratio.{label}"] = {"wall": values[0], "cpu": values[-1]}
        text = "  ".join(f"{v:7.3f}" for v in values)
        if goal is None:
            verdict = "(info)"
        else:
            oks = [v < goal if below else v <= goal for v in values]
            verdict = "[" + ("< " if below else "<= ") + f"{goal:g}: "
            verdict += "/".join("ok" if ok else "MISSED" for ok in oks) + "]"
        print(f"  {label:<52} {text}  {verdict}")

    lm, lm10 = "log_metric_us", "log_metrics10_us"
    for what, key in (("log_metric", lm), ("log_metrics", lm10)):
        ratio(f"{what}: spool / noop+registry", f"spool_default.{key}", f"noop_registry.{key}", 1.1)
    ratio(
        "log_metric: spool / noop, MLflow defaults",
        f"spool_default.{lm}",
        f"noop_default.{lm}",
        GOAL_LOG_METRIC_VS_NOOP_DEFAULT,
    )
    ratio(
        "log_metrics: spool / noop, MLflow defaults",
        f"spool_default.{lm10}",
        f"noop_default.{lm10}",
        GOAL_LOG_METRICS_VS_NOOP_DEFAULT,
    )
    ratio(
        "log_batch(1,000): spool / noop",
        "spool_default.log_batch1000_per_metric_us",
        "noop_default.log_batch1000_per_metric_us",
        GOAL_LOG_BATCH,
    )
    if many:
        ratio(
            f"get_run: spool after {args.points} / after 100",
            "spool_get_run.get_run_many_us",
            "spool_get_run.get_run_100_us",
            GOAL_GET_RUN_GROWTH,
        )
        ratio(
            f"get_run: spool after {args.points} / sqlite",
            "spool_get_run.get_run_many_us",
            "sqlite_default.get_run_100_us",
            1.0,
            below=True,
        )
    for what, key in (("log_metric", lm), ("log_metrics", lm10)):
        ratio(
            f"{what}: spool+registry / noop+registry",
            f"spool_registry.{key}",
            f"noop_registry.{key}",
            None,
        )
    ratio(
        "log_metric: noop defaults / noop+registry",
        f"noop_default.{lm}",
        f"noop_registry.{lm}",
        None,
    )
    ratio(
        "log_metric: sqlite / noop, MLflow defaults",
        f"sqlite_default.{lm}",
        f"noop_default.{lm}",
        None,
    )
    estimates(fig)

    for label, prof in profiles.items():
        unit = "metric" if "log_batch" in label else "call"
        us = prof["profiled_us_per_unit"]
        print(f"profile: {label} — {us:.1f} µs/{unit} under cProfile; % of profiled time")
        print("  by own time:")
        for row in prof["by_self"]:
            print(f"    {row}")
        print("  by cumulative time:")
        for row in prof["by_cum"]:
            print(f"    {row}")


def estimates(fig: dict[str, dict[str, float]]) -> None:
    """The spool's fluent cost rebuilt from its parts (CPU medians), against the do-nothing
    store: noop+registry's fluent call, plus what the spool store itself costs more, plus two
    registry-URI resolutions (one per client the call builds) at their cost in that process.
    Whole fluent calls differ by more than the store's part from one process to the next on a
    busy machine; the parts, timed in tight loops, are steadier."""

    def med(key: str) -> float:
        return fig[key]["median"]

    print("Estimated from the parts (CPU): noop+registry call + store part + 2 x resolution")
    for what, call, part in (
        ("log_metric", "log_metric_cpu_us", "store_log_metric_cpu_us"),
        ("log_metrics", "log_metrics10_cpu_us", "store_log_batch10_cpu_us"),
    ):
        base = med(f"noop_registry.{call}")
        base_resolve = med("noop_registry.resolve_registry_cpu_us")
        for config in ("spool_default", "spool_registry"):
            us = base + med(f"{config}.{part}") - med(f"noop_registry.{part}")
            us += 2 * (med(f"{config}.resolve_registry_cpu_us") - base_resolve)
            vs_registry, vs_default = us / base, us / med(f"noop_default.{call}")
            fig[f"estimate.{what}.{config}"] = {
                "us": us,
                "vs_noop_registry": vs_registry,
                "vs_noop_default": vs_default,
            }
            print(
                f"  {what + ': ' + config:<34} {us:8.2f} µs  {vs_registry:6.3f} x noop+registry"
                f"  {vs_default:6.3f} x noop defaults"
            )
    noop = med("noop_default.log_batch1000_per_metric_cpu_us")
    part = med("spool_default.store_log_batch1000_per_metric_cpu_us")
    part -= med("noop_default.store_log_batch1000_per_metric_cpu_us")
    fig["estimate.log_batch1000.spool"] = {"us": noop + part, "vs_noop": (noop + part) / noop}
    print(
        f"  {'log_batch(1,000): spool':<34} {noop + part:8.2f} µs  "
        f"{(noop + part) / noop:6.3f} x noop (per metric: noop's call + the spool store's part)"
    )


def report_ablation(ablation: dict[str, Any]) -> None:
    """Each stripped copy of the write path against the do-nothing store: how much of the
    goal's 10 % the parts that the guarantees require (one write of one framed line) take."""
    for kind, best in ablation.items():
        base = best["noop"]
        print(f"ablation: fluent {kind}, one process, alternating blocks (best), wall µs/call")
        for name, us in best.items():
            print(f"  {name:<30} {us:8.2f}  +{us - base:6.2f}  {us / base:6.3f} x noop+registry")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (fresh processes each)")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per child (best)")
    parser.add_argument("--calls", type=int, default=4_000, help="fluent calls per child")
    parser.add_argument("--sqlite-calls", type=int, default=60, help="fluent calls into SQLite")
    parser.add_argument("--batches", type=int, default=50, help="log_batch calls of 1,000")
    parser.add_argument("--points", type=int, default=1_000_000, help="points before get_run")
    parser.add_argument("--get-runs", type=int, default=10_000, help="get_run calls timed")
    parser.add_argument("--sqlite-get-runs", type=int, default=100)
    parser.add_argument("--profile-calls", type=int, default=2_000)
    parser.add_argument("--profile-lines", type=int, default=12)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--ablate",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time the fluent calls through stripped copies of the spool write path "
        "(one child, alternating blocks, best of ROUNDS)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, few calls")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.repeat, args.calls, args.sqlite_calls, args.batches = 1, 500, 10, 5
        args.points, args.get_runs, args.sqlite_get_runs = 20_000, 1_000, 20
        args.profile_calls = 300

    raw: dict[str, list[float]] = {}
    profiles: dict[str, Any] = {}
    ablation: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ff-bench-dropin-", dir=args.dir) as tmp:
        folder = Path(tmp)
        for r in range(args.repeat):
            for name, (store, registry, task) in configurations(args).items():
                print(f"round {r + 1}/{args.repeat}: {name}", file=sys.stderr, flush=True)
                for key, value in run_child(folder, store, registry, task).items():
                    raw.setdefault(f"{name}.{key}", []).append(value)
        if args.ablate:
            print("ablation", file=sys.stderr, flush=True)
            task = {"ablate": args.ablate, "calls": max(args.calls // 10, 50)}
            ablation = run_child(folder, "spool", "default", task)
        if not args.no_profile:
            for label, store, kind in PROFILES:
                print(f"profile: {label}", file=sys.stderr, flush=True)
                task = {
                    "profile": kind,
                    "calls": args.profile_calls,
                    "limit": args.profile_lines,
                }
                profiles[label] = run_child(folder, store, "default", task)

    fig = {name: summary(values) for name, values in raw.items()}
    report(args, fig, profiles)
    report_ablation(ablation)
    if args.json:
        out = {"figures": fig, "raw": raw, "profiles": profiles, "ablation": ablation}
        print(json.dumps(out, sort_keys=True))
    return 0


def _mlflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlflow")
    except PackageNotFoundError:
        return version("mlflow-skinny") + " (skinny)"


if __name__ == "__main__":
    sys.exit(main())
