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


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster; yield an admin URI (database ``postgres``)."""
    env_uri = os.environ.get("FF_TEST_POSTGRES_URI")
    if env_uri:
        yield env_uri
        return
    # Its own folder directly under the temp root: the postgres user must be able to reach it,
    # and pytest's tmp_path folders are private to root.
    base = Path(tempfile.mkdtemp(prefix="ff-pg-"))
    base.chmod(0o755)
    data = base / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
    port = free_port()
    subprocess.run(
        _as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres_user(
            [_pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "log"), "-w", "start"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres_user([_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(base, ignore_errors=True)


def create_database(admin_uri: str, prefix: str = "ff") -> str:
    """Create a fresh database on the cluster of ``admin_uri``; return its URI."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_uri.rsplit("/", 1)[0] + "/" + name


@contextmanager
def mlflow_server(base: Path, backend_uri: str | None = None) -> Iterator[tuple[str, int]]:
    """Start ``mlflow server`` on loopback with its own store; yield (uri, pid)."""
    env_uri = os.environ.get("FF_TEST_MLFLOW_SERVER_URI")
    if env_uri:
        yield env_uri, -1
        return
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_uri or f"sqlite:///{base / 'server.db'}"
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    log = open(base / "server.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(base / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}; see {base / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {base / 'server.log'}")
            time.sleep(0.3)
        yield uri, proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
