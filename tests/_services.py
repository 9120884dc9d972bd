"""Real servers for the destination tests: a throw-away PostgreSQL cluster and an mlflow server.

Both listen on 127.0.0.1 only, live under a temporary folder, and are stopped by pid. When
``FF_TEST_POSTGRES_URI`` / ``FF_TEST_MLFLOW_SERVER_URI`` are set, the tests use those servers
instead of starting their own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed; install Debian's postgresql package "
            "(./tools/test.sh does) or set FF_TEST_POSTGRES_URI"
        )
    return candidates[-1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # Debian's server refuses to run as root; run it as the postgres user when we are root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PostgresCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1 that can be stopped and started again on
    the same port (to simulate an outage). ``admin_uri`` names the ``postgres`` database."""

    def __init__(self) -> None:
        # Its own folder directly under the temp root: the postgres user must be able to reach
        # it, and pytest's tmp_path folders are private to root.
        self.base = Path(tempfile.mkdtemp(prefix="ff-pg-"))
        self.base.chmod(0o755)
        self.data = self.base / "pgdata"
        self.data.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        self.admin_uri = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            _as_postgres_user(
                [_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres_user(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    opts,
                    "-l",
                    str(self.data / "log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            _as_postgres_user([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def pg_cluster() -> Iterator[PostgresCluster | None]:
    """Start a throw-away cluster and yield it; yield None when ``FF_TEST_POSTGRES_URI`` names
    a server to use instead (that one cannot be stopped by the tests)."""
    if os.environ.get("FF_TEST_POSTGRES_URI"):
        yield None
        return
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster; yield an admin URI (database ``postgres``)."""
    env_uri = os.environ.get("FF_TEST_POSTGRES_URI")
    if env_uri:
        yield env_uri
        return
    with pg_cluster() as cluster:
        assert cluster is not None
        yield cluster.admin_uri


def create_database(admin_uri: str, prefix: str = "ff", template: str | None = None) -> str:
    """Create a fresh database on the cluster of ``admin_uri`` (a copy of ``template`` if
    given); return its URI."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    return admin_uri.rsplit("/", 1)[0] + "/" + name


def migrated_template(admin_uri: str, scratch: Path) -> str:
    """A database holding MLflow's empty, fully migrated schema; return its name.

    MLflow migrates a new database on first use (seconds); ``create_database(admin,
    template=name)`` copies this one instead (a fraction of a second)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = create_database(admin_uri, prefix="ff_template")
    store = SqlAlchemyStore(uri, str(scratch))  # type: ignore[no-untyped-call]
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(uri, None)  # type: ignore[attr-defined]
    return uri.rsplit("/", 1)[1]


def server_env() -> dict[str, str]:
    """The server's environment: without MLflow's job runner, which tracking never uses and
    which starts seven more processes, each importing MLflow (half a minute of CPU here)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """``mlflow server`` on loopback with its own store; can be stopped (by pid) and started
    again on the same port with the same store."""

    def __init__(self, base: Path, backend_uri: str | None = None) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = backend_uri or f"sqlite:///{base / 'server.db'}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def start(self) -> None:
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        with open(self.base / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    mlflow_bin,
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    self.backend,
                    "--artifacts-destination",
                    str(self.base / "artifacts"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=server_env(),
            )
        self.proc = proc
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}; see {self.base / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start; see {self.base / 'server.log'}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def mlflow_server(base: Path, backend_uri: str | None = None) -> Iterator[tuple[str, int]]:
    """Start ``mlflow server`` on loopback with its own store; yield (uri, pid)."""
    env_uri = os.environ.get("FF_TEST_MLFLOW_SERVER_URI")
    if env_uri:
        yield env_uri, -1
        return
    server = MlflowServer(base, backend_uri)
    try:
        server.start()
        yield server.uri, server.pid
    finally:
        server.stop()
