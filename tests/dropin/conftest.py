"""Fixtures of the drop-in tests: run unmodified MLflow scripts, sync their spools, compare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CONFIG_ENV_VARS

# MLflow variables a developer's shell may set that change where a script logs.
MLFLOW_ENV_VARS = (
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_REGISTRY_URI",
)
SCRIPT = "script.py"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ours minus configuration variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV_VARS + MLFLOW_ENV_VARS}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def run_script(
    code: str,
    cwd: Path,
    tracking_uri: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    *,
    args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) as ``script.py`` in ``cwd`` with MLFLOW_TRACKING_URI set.

    The script is started as ``python script.py`` from ``cwd``, as a user would: MLflow's
    ``mlflow.source.name`` tag is then ``script.py`` whichever folder the script runs in."""
    script = cwd / SCRIPT
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        env=child_env({"MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def ff_sync(
    spool: Path, db: Path, *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ff-sync [args]`` replaying ``spool`` into the SQLite store ``db``."""
    proc = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync", *args],
        cwd=cwd or db.parent,
        env=child_env({"FF_SPOOL_ROOT": str(spool), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ff-sync {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def dropin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two working folders: ``direct`` (a script logs into SQLite) and ``spooled``."""
    direct, spooled = tmp_path / "direct", tmp_path / "spooled"
    direct.mkdir()
    spooled.mkdir()
    return direct, spooled


def direct_uri(direct: Path) -> str:
    """The tracking URI of the ``direct`` way: MLflow's own SQLite store."""
    return f"sqlite:///{direct / 'direct.db'}"


def spool_uri(spooled: Path) -> str:
    """The tracking URI of the ``spooled`` way: a spool inside ``spooled``."""
    return f"spool://{(spooled / 'spool').as_posix()}"


def run_both(
    code: str,
    direct: Path,
    spooled: Path,
    env: Mapping[str, str] | None = None,
    *,
    env_spooled: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    check: bool = True,
    timeout: float = 180,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run the same script both ways at once (two processes): into ``direct/direct.db`` and
    into ``spooled/spool``. ``env_spooled`` replaces ``env`` for the spooled process (a run id
    differs between the ways). Returns (direct, spooled)."""
    with ThreadPoolExecutor(2) as pool:
        fd = pool.submit(
            run_script, code, direct, direct_uri(direct), env, timeout, check, args=args
        )
        fs = pool.submit(
            run_script,
            code,
            spooled,
            spool_uri(spooled),
            env if env_spooled is None else env_spooled,
            timeout,
            check,
            args=args,
        )
        return fd.result(), fs.result()


@dataclass
class Ways:
    """One script, two ways, under ``root``: ``direct/`` logs into ``direct/direct.db``;
    ``spooled/`` logs into ``spooled/spool``, which ``sync`` replays into ``synced.db``."""

    root: Path

    def __post_init__(self) -> None:
        self.direct.mkdir(parents=True, exist_ok=True)
        self.spooled.mkdir(parents=True, exist_ok=True)

    @property
    def direct(self) -> Path:
        return self.root / "direct"

    @property
    def spooled(self) -> Path:
        return self.root / "spooled"

    @property
    def spool(self) -> Path:
        return self.spooled / "spool"

    @property
    def direct_db(self) -> Path:
        return self.direct / "direct.db"

    @property
    def synced_db(self) -> Path:
        return self.root / "synced.db"

    def start_from(self, template: Path) -> None:
        """Start both stores as copies of an empty, migrated store (saves MLflow's migration
        in each process; the content is that of a fresh store)."""
        shutil.copyfile(template, self.direct_db)
        shutil.copyfile(template, self.synced_db)

    def run(
        self,
        code: str,
        env: Mapping[str, str] | None = None,
        *,
        env_spooled: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        check: bool = True,
    ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        """Run ``code`` both ways at once; returns (direct, spooled)."""
        return run_both(
            code,
            self.direct,
            self.spooled,
            env,
            env_spooled=env_spooled,
            args=args,
            check=check,
        )

    def sync(self, *args: str) -> subprocess.CompletedProcess[str]:
        """ff-sync the spool into ``synced.db``."""
        return ff_sync(self.spool, self.synced_db, *args, cwd=self.root)


@pytest.fixture
def ways(dropin_dirs: tuple[Path, Path]) -> Ways:
    """The two ways under this test's tmp_path (``direct`` and ``spooled`` as dropin_dirs)."""
    return Ways(dropin_dirs[0].parent)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once by MLflow in a child process."""
    folder = tmp_path_factory.mktemp("empty-store")
    db = folder / "empty.db"
    code = (
        "from mlflow import MlflowClient\n"
        f"MlflowClient({f'sqlite:///{db}'!r}).search_experiments()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return db


RunScript = Callable[..., subprocess.CompletedProcess[str]]
