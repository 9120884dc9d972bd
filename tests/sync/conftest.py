"""Fixtures of the sync tests: a project under tmp_path with a real MLflow store.

Spools are written by the real tracker in child processes (``Project.spool``); syncs run
through the real command (``Project.ff_sync``) or the library (``Project.sync``); the MLflow
state is read back with :func:`formula_foundry.sync.mlflow.snapshot.snapshot`.

By default the store is SQLite. A test that also takes the ``destination`` fixture runs three
times, its project's ``tracking.backend_store_uri`` pointing at:

* ``sqlite``: a file under the project (as without the fixture);
* ``postgresql`` (marker ``postgres``): a fresh database of one PostgreSQL cluster per test
  session, copied from a database MLflow already migrated (copying takes 0.2 s, migrating 4 s);
* ``http`` (marker ``server``): one ``mlflow server`` per test session (starting one takes
  20-30 s on a busy machine, too slow per test). Tests are isolated by their run ids (the
  tracker's uuids; fixed run ids carry a uuid too) and ``Project.snapshot`` of that server only
  reads the runs of the project's own spool. Experiments are shared; their names come from the
  spools.

``pytest -m "not postgres and not server"`` runs only the SQLite cases (and starts no server).
The services are the ones of ``tests/_services.py`` (or ``FF_TEST_POSTGRES_URI`` /
``FF_TEST_MLFLOW_SERVER_URI``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.sync import SyncReport, load_sync_settings, sync_once
from formula_foundry.sync.engine.destination import destination_key
from tests._proc import CONFIG_ENV_VARS
from tests._services import (
    MlflowServer,
    PostgresCluster,
    create_database,
    migrated_template,
    pg_cluster,
)

PYTHON = sys.executable
FF_SYNC = str(Path(sys.executable).with_name("ff-sync"))
_OVERRIDES = CONFIG_ENV_VARS  # the one list (tests/_proc.py)

CONFIG = """\
tracking:
  backend_store_uri: "{backend}"
  artifact_root: "data/mlflow/artifacts"
spool:
  root: "data/runs"
artifacts:
  store_root: "data/artifacts"
sync:
  state_dir: "data/sync"
  lock_timeout_s: {lock_timeout}
  retries: {retries}
  backoff_s: {backoff}
"""


DEFAULT_BACKEND = "sqlite:///data/mlflow/mlruns.db"


@dataclass
class Project:
    """A project folder: config/mlflow.yaml, spools, a store (SQLite unless ``backend_uri``),
    the sync state. ``shared``: the store also holds other tests' runs (the session's mlflow
    server), so ``snapshot`` of it only reads this project's runs."""

    root: Path
    backend_uri: str | None = None
    shared: bool = False

    @property
    def config(self) -> Path:
        return self.root / "config" / "mlflow.yaml"

    @property
    def spool_root(self) -> Path:
        return self.root / "data" / "runs"

    @property
    def db(self) -> Path:
        return self.root / "data" / "mlflow" / "mlruns.db"

    @property
    def uri(self) -> str:
        return self.backend_uri or f"sqlite:///{self.db}"

    @property
    def state_dir(self) -> Path:
        return self.root / "data" / "sync"

    def state_folder(self, uri: str | None = None) -> Path:
        return self.state_dir / destination_key(uri or self.uri)

    def configure(self, lock_timeout: float = 2.0, retries: int = 1, backoff: float = 0.05) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            CONFIG.format(
                backend=self.backend_uri or DEFAULT_BACKEND,
                lock_timeout=lock_timeout,
                retries=retries,
                backoff=backoff,
            )
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
        env["FF_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def python(
        self,
        code: str,
        *args: str,
        timeout: float = 120.0,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a snippet in a fresh interpreter configured for this project (plus ``env``)."""
        result = subprocess.run(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            cwd=self.root,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"child failed ({result.returncode}):\n{result.stderr}")
        return result

    def spool(self, code: str, *args: str) -> str:
        """Log runs with the real tracker in a child process; return its stdout."""
        prelude = "from formula_foundry.tracking import get_tracker\ntracker = get_tracker()\n"
        return self.python(prelude + textwrap.dedent(code), *args).stdout

    def ff_sync(
        self, *args: str, timeout: float = 180.0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``ff-sync`` command."""
        return subprocess.run(
            [FF_SYNC, "--config", str(self.config), *args],
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sync(self, **kw: Any) -> SyncReport:
        """One in-process library pass (``tracking_uri``/``spool_root`` override)."""
        uri = kw.pop("tracking_uri", None)
        spool = kw.pop("spool_root", None)
        settings = load_sync_settings(self.config, tracking_uri=uri, spool_root=spool)
        return sync_once(settings, **kw)

    def own_runs(self) -> list[str]:
        """The run ids of this project's spool."""
        if not self.spool_root.is_dir():
            return []
        return sorted(p.name for p in self.spool_root.iterdir() if p.is_dir())

    def snapshot(self, uri: str | None = None) -> dict[str, Any]:
        """The store's content, read through a freshly opened store (MLflow caches stores per
        URI in a process; a test that replaces the file must not read the old one). On a
        shared store, only this project's runs (and their experiments)."""
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        from formula_foundry.sync.mlflow.snapshot import snapshot

        uri = uri or self.uri
        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
        if self.shared and uri == self.uri:
            return snapshot_of_runs(uri, self.own_runs())
        return snapshot(uri)


def snapshot_of_runs(uri: str, run_uuids: list[str]) -> dict[str, Any]:
    """``snapshot(uri)`` restricted to the runs of ``run_uuids`` and their experiments, read
    without listing the whole store (a shared server holds every test's runs)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from formula_foundry.sync.mlflow import snapshot as snap_mod

    client = MlflowClient(tracking_uri=uri)
    names: dict[str, str] = {}
    token: str | None = None
    while True:
        exps = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        names.update({e.experiment_id: e.name for e in exps})
        token = exps.token
        if not token:
            break
    found: list[Any] = []
    ids = sorted(names)
    for spool_run_id in run_uuids:
        for i in range(0, len(ids), 100):
            found.extend(
                client.search_runs(
                    ids[i : i + 100],
                    f"tags.`ff.run_uuid` = '{spool_run_id}'",
                    run_view_type=ViewType.ALL,
                    max_results=1000,
                )
            )
    uuid_of: dict[str, str | None] = {r.info.run_id: r.data.tags.get("ff.run_uuid") for r in found}
    for run in found:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and parent not in uuid_of:
            uuid_of[parent] = client.get_run(parent).data.tags.get("ff.run_uuid")
    runs: dict[str, Any] = {}
    seen: dict[str, list[str]] = {}
    used: set[str] = set()
    for run in found:
        spool_run_id = run.data.tags["ff.run_uuid"]
        seen.setdefault(spool_run_id, []).append(run.info.run_id)
        used.add(run.info.experiment_id)
        if spool_run_id not in runs:
            runs[spool_run_id] = snap_mod._run(client, run, names, uuid_of, True)
    experiments = {}
    for exp_id in sorted(used):
        exp = client.get_experiment(exp_id)
        experiments[exp.name] = {
            "lifecycle_stage": exp.lifecycle_stage,
            "tags": {k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")},
        }
    return {
        "experiments": experiments,
        "runs": runs,
        "duplicates": {k: sorted(v) for k, v in seen.items() if len(v) > 1},
        "untracked_runs": 0,
    }


def comparable(snap: dict[str, Any]) -> dict[str, Any]:
    """What must match across store kinds and between a shared server and a private store:
    the runs and their duplicates (experiment artifact locations differ by design)."""
    return {"duplicates": snap["duplicates"], "runs": snap["runs"]}


# -- destinations ----------------------------------------------------------------------------


@dataclass
class PgService:
    cluster: PostgresCluster | None  # None: FF_TEST_POSTGRES_URI, which cannot be stopped
    admin_uri: str
    template: str

    def database(self) -> str:
        return create_database(self.admin_uri, template=self.template)


@pytest.fixture(scope="session")
def pg_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgService]:
    """One PostgreSQL cluster per session, with a migrated template database."""
    with pg_cluster() as cluster:
        admin = cluster.admin_uri if cluster else os.environ["FF_TEST_POSTGRES_URI"]
        template = migrated_template(admin, tmp_path_factory.mktemp("pg-template"))
        yield PgService(cluster, admin, template)


@dataclass
class HttpService:
    server: MlflowServer | None  # None: FF_TEST_MLFLOW_SERVER_URI, which cannot be stopped
    uri: str


@pytest.fixture(scope="session")
def http_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpService]:
    """One ``mlflow server`` per session (SQLite store of its own)."""
    env_uri = os.environ.get("FF_TEST_MLFLOW_SERVER_URI")
    if env_uri:
        yield HttpService(None, env_uri)
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield HttpService(server, server.uri)
    finally:
        server.stop()


@dataclass
class Destination:
    """Where a parametrised test's project syncs to.

    ``uri``: the project's store. ``fresh()``: another empty store of the same kind (SQLite,
    PostgreSQL; the server has one store, so ``None``). ``outage()``: a context in which the
    store is unavailable (SQLite: locked; PostgreSQL: the cluster stopped; the server: killed
    by pid), back (same URI, same content) on exit; ``None`` when the store is not ours to
    stop (``FF_TEST_*`` servers)."""

    kind: str
    uri: str
    shared: bool
    fresh: Callable[[], str | None]
    outage: Callable[[], AbstractContextManager[None]] | None
    unique: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


DESTINATIONS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("http", id="http", marks=pytest.mark.server),
]


@pytest.fixture(params=DESTINATIONS)
def destination(request: pytest.FixtureRequest, tmp_path: Path) -> Destination:
    """The store of the test's project, once per kind: sqlite, postgresql, http."""
    kind = request.param
    if kind == "sqlite":
        counter = iter(range(1, 1_000_000))
        db = tmp_path / "project" / "data" / "mlflow" / "mlruns.db"

        def fresh_sqlite() -> str:
            return f"sqlite:///{tmp_path / f'fresh-{next(counter)}.db'}"

        @contextmanager
        def sqlite_locked() -> Iterator[None]:
            import sqlite3

            holder = sqlite3.connect(db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                holder.execute("ROLLBACK")
                holder.close()

        return Destination(kind, f"sqlite:///{db}", False, fresh_sqlite, sqlite_locked)
    if kind == "postgresql":
        pg: PgService = request.getfixturevalue("pg_service")
        cluster = pg.cluster

        @contextmanager
        def pg_down() -> Iterator[None]:
            assert cluster is not None
            cluster.stop()
            try:
                yield
            finally:
                cluster.start()

        return Destination(kind, pg.database(), False, pg.database, pg_down if cluster else None)
    http: HttpService = request.getfixturevalue("http_service")
    server = http.server

    @contextmanager
    def http_down() -> Iterator[None]:
        assert server is not None
        server.stop(signal.SIGKILL)
        try:
            yield
        finally:
            server.start()

    return Destination(kind, http.uri, True, lambda: None, http_down if server else None)


@pytest.fixture
def project(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    """A configured project under tmp_path; the test runs with it as working directory. Its
    store is SQLite, or the ``destination``'s when the test takes that fixture."""
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    if "destination" in request.fixturenames:
        dest: Destination = request.getfixturevalue("destination")
        proj = Project(tmp_path / "project", None if dest.kind == "sqlite" else dest.uri)
        proj.shared = dest.shared
    else:
        proj = Project(tmp_path / "project")
    proj.configure()
    monkeypatch.chdir(proj.root)
    yield proj


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under ``root``: (size, mtime_ns, mode) — to prove nothing changed."""
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            size = 0 if path.is_dir() else st.st_size
            out[str(path.relative_to(root))] = (size, st.st_mtime_ns, st.st_mode)
    return out


# A spool with the shapes the sync must handle: nesting across experiments, NaN and ±inf,
# multi-key metric events, params, tags set twice, artifact references, a failed child.
RICH_SPOOL = """
import math
with tracker.start_run(run_name="parent", tags={"team": "si"}) as parent:
    parent.log_params({"lr": 0.1, "layers": 4})
    for i in range(int(__import__("sys").argv[1])):
        parent.log_metric("loss", 1.0 / (i + 1), step=i)
    parent.log_metric("odd", math.nan, step=1)
    parent.log_metric("odd", math.inf, step=2)
    parent.log_metric("odd", -math.inf, step=3)
    parent.log_metrics({"a": 1.5, "b": -2}, step=7)
    parent.set_tag("phase", "one")
    parent.set_tag("phase", "two")
    parent.log_artifact_reference("out/coupon.kicad_pcb", "sha256:" + "ab" * 32, 1234)
    with tracker.start_run(run_name="child", nested=True, experiment_name="ff-m2-simulation") as c:
        c.log_param("solver", "fdtd")
        c.log_metric("sim_time", 120.0)
    try:
        with tracker.start_run(run_name="broken", nested=True) as b:
            b.log_metric("x", 1.0)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
print(parent.run_id, c.run_id, b.run_id)
"""
