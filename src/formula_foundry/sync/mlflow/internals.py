"""The MLflow internals the adapter (:mod:`formula_foundry.sync.mlflow.client_sink`) reaches into:
the store MLflow's own migrations create, the REST store's request machinery (one encoding
per batch, see :mod:`~formula_foundry.sync.mlflow.rest_batch`) and the per-process caches of stores.
Private MLflow APIs live here, each guarded, so a change in MLflow's layout shows in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from formula_foundry.errors import ConfigError
from formula_foundry.sync.mlflow.local_upload import LocalRoot


def rest_poster(store: Any) -> Callable[[bytes], None] | None:
    """Posts a ``LogBatch`` body to ``store``'s server as its ``RestStore.log_batch`` would;
    ``None`` for other stores and for requests that go through the Databricks SDK."""
    try:
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.rest_utils import http_request, verify_rest_response
    except ImportError:  # pragma: no cover - another MLflow layout: its own log_batch then
        return None
    info = getattr(store, "_METHOD_TO_INFO", {}).get(LogBatch)
    if not isinstance(store, RestStore) or info is None:
        return None
    if getattr(store.get_host_creds(), "use_databricks_sdk", False):
        return None
    endpoint, method = info
    check_workspace = getattr(store, "_validate_workspace_support_if_specified", lambda: None)
    headers = {"Content-Type": "application/json"}

    def post(body: bytes) -> None:
        check_workspace()
        response = http_request(  # type: ignore[no-untyped-call]
            store.get_host_creds(), endpoint, method, data=body, extra_headers=headers
        )
        verify_rest_response(response, endpoint)

    return post


def forget_cached_store(uri: str) -> None:
    """Drop MLflow's store and engine cached for ``uri`` in this process (``ff-sync watch``):
    after the file was deleted, they would still write into the deleted one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    with contextlib.suppress(AttributeError):  # private API: another MLflow, another cache
        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


def create_sqlite_store(uri: str, artifact_root: Path, description: str) -> None:
    """Create a fresh SQLite store atomically: a kill mid-migration must not break it."""
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest.startswith(":memory:") or not uri.startswith("sqlite:///"):
        return
    db = Path(rest)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of {description}: {exc.strerror or exc}"
        ) from None
    prefix = f".{db.name}.ff-init-"
    for old in db.parent.glob(prefix + "*"):
        pid = old.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.parent / f"{prefix}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", str(artifact_root))  # type: ignore[no-untyped-call]
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)  # never replaces a store someone else created meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    forget_cached_store(uri)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_artifact_root(client: Any, mlflow_run_id: str) -> LocalRoot | None:
    """The run's artifact folder, with the prefix of the temporary files MLflow's local
    artifact store writes before renaming them into place, when the run's artifacts are written
    on this host; ``None`` otherwise (a server, a cloud store, another MLflow layout).

    A process killed mid-upload leaves such a file behind (MLflow removes it only on an
    exception); the next upload into the folder removes it.
    """
    try:
        from mlflow.store.artifact import local_artifact_repo as local

        repo = client._tracking_client._get_artifact_repo(mlflow_run_id)
        prefix = local._TEMP_ARTIFACT_PREFIX
    except (ImportError, AttributeError):  # pragma: no cover - another MLflow layout
        return None
    if not isinstance(repo, local.LocalArtifactRepository) or not isinstance(prefix, str):
        return None
    return LocalRoot(Path(repo.artifact_dir), prefix)


def list_run_artifacts(client: Any, mlflow_run_id: str) -> Callable[[str | None], Any]:
    """``list_artifacts(path)`` of the run's cached artifact repository: one request per
    listing, where ``MlflowClient.list_artifacts`` first reads the run twice and searches its
    logged models (four requests to a server)."""
    try:
        repo = client._tracking_client._get_artifact_repo(mlflow_run_id)
        listing: Callable[[str | None], Any] = repo.list_artifacts
    except AttributeError:  # pragma: no cover - another MLflow layout: the public call
        return lambda path: client.list_artifacts(mlflow_run_id, path)
    return listing
