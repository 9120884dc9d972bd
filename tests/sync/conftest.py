"""Fixtures of the sync tests: a project under tmp_path with a real SQLite MLflow store.

Spools are written by the real tracker in child processes (``Project.spool``); syncs run
through the real command (``Project.ff_sync``) or the library (``Project.sync``); the MLflow
state is read back with :func:`formula_foundry.sync.snapshot.snapshot`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.sync import SyncReport, load_sync_settings, sync_once
from formula_foundry.sync.sync_state import destination_key

PYTHON = sys.executable
FF_SYNC = str(Path(sys.executable).with_name("ff-sync"))
_OVERRIDES = ("FF_CONFIG", "FF_SPOOL_ROOT", "MLFLOW_TRACKING_URI", "FF_TRACKING_DISABLED")

CONFIG = """\
tracking:
  backend_store_uri: "sqlite:///data/mlflow/mlruns.db"
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


@dataclass
class Project:
    """A project folder: config/mlflow.yaml, spools, a SQLite store, the sync state."""

    root: Path

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
        return f"sqlite:///{self.db}"

    @property
    def state_dir(self) -> Path:
        return self.root / "data" / "sync"

    def state_folder(self, uri: str | None = None) -> Path:
        return self.state_dir / destination_key(uri or self.uri)

    def configure(self, lock_timeout: float = 2.0, retries: int = 1, backoff: float = 0.05) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            CONFIG.format(lock_timeout=lock_timeout, retries=retries, backoff=backoff)
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
        env["FF_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def python(
        self, code: str, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a snippet in a fresh interpreter configured for this project."""
        result = subprocess.run(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            cwd=self.root,
            env=self.env(),
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

    def snapshot(self, uri: str | None = None) -> dict[str, Any]:
        """The store's content, read through a freshly opened store (MLflow caches stores per
        URI in a process; a test that replaces the file must not read the old one)."""
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        from formula_foundry.sync.snapshot import snapshot

        uri = uri or self.uri
        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
        return snapshot(uri)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A configured project under tmp_path; the test runs with it as working directory."""
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
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
