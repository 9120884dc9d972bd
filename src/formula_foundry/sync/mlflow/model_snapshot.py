"""The logged models of a tracking store, read back for ``ff-sync verify``.

A synced model carries the node's model id as its tag ``ff.model_id``; :meth:`ModelReader.find`
lists every model carrying it, in every experiment (two would be a duplicate the replay must
never make). :meth:`ModelReader.model` reads one model (with its linked metric points, which
``get_logged_model`` returns anyway), :meth:`ModelReader.files` downloads
its files one by one and hashes them, as the run files are checked.

MLflow's client and its download function come from :mod:`formula_foundry.sync.mlflow.snapshot`
(the module that imports MLflow): this one does not import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from formula_foundry.tracking.events import MODEL_ID_TAG

T = TypeVar("T")
Caller = Callable[[str, Callable[[], Any]], Any]
# A linked metric point: key, step, timestamp, value, dataset name, dataset digest.
StoredMetric = tuple[str, int, int, float, str | None, str | None]


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One destination model as ``verify`` compares it."""

    model_id: str
    experiment: str | None
    source_run_id: str | None
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    artifact_location: str
    metrics: tuple[StoredMetric, ...] = ()


class ModelReader:
    """Read-only access to a store's logged models (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        call: Caller,
        download: Callable[..., str],
        experiments: dict[str, str],
        quiet: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self._client, self._call, self._download = client, call, download
        self._experiments = experiments  # id -> name, every experiment (StoreReader.index)
        self._quiet = quiet

    def find(self, spool_model_id: str) -> list[str]:
        """The ids of every model tagged ``ff.model_id = spool_model_id``, sorted."""
        value = spool_model_id.replace("\\", "\\\\").replace("'", "\\'")
        query = f"tags.`{MODEL_ID_TAG}` = '{value}'"
        ids, found = sorted(self._experiments), set[str]()
        for i in range(0, len(ids), 100):
            token: str | None = None
            while True:
                page = self._call(
                    f"look up logged model {spool_model_id}",
                    partial(
                        self._client.search_logged_models,
                        ids[i : i + 100],
                        filter_string=query,
                        max_results=100,
                        page_token=token,
                    ),
                )
                found.update(str(m.model_id) for m in page)
                token = getattr(page, "token", None)
                if not token:
                    break
        return sorted(found)

    def model(self, model_id: str) -> StoredModel:
        m = self._call(
            f"read logged model {model_id}", lambda: self._client.get_logged_model(model_id)
        )
        return StoredModel(
            model_id=str(m.model_id),
            experiment=self._experiments.get(str(m.experiment_id)),
            source_run_id=m.source_run_id,
            name=m.name,
            status=getattr(m.status, "name", str(m.status)),
            params=dict(m.params),
            tags=dict(m.tags),
            artifact_location=str(m.artifact_location),
            metrics=tuple(
                (x.key, x.step, x.timestamp, x.value, x.dataset_name, x.dataset_digest)
                for x in m.metrics or ()
            ),
        )

    def files(self, model: StoredModel) -> dict[str, tuple[int, str]]:
        """Path → (size, ``sha256:<hex>``) of every file of the model, each downloaded."""
        paths = list(self._paths(model.model_id))
        out: dict[str, tuple[int, str]] = {}
        location = model.artifact_location.rstrip("/")
        with tempfile.TemporaryDirectory(prefix="ff-verify-model-") as tmp, self._quiet():
            for n, path in enumerate(sorted(paths)):
                dst = Path(tmp, str(n))  # one folder per file: nothing left to clash with
                dst.mkdir()
                fetch = partial(
                    self._download, artifact_uri=f"{location}/{path}", dst_path=str(dst)
                )
                local = Path(
                    self._call(f"download {path!r} of logged model {model.model_id}", fetch)
                )
                out[path] = (local.stat().st_size, _digest(local))
                local.unlink()
        return out

    def _paths(self, model_id: str) -> Iterator[str]:
        pending: list[str | None] = [None]
        while pending:
            folder = pending.pop()
            listed = self._call(
                f"list the files of logged model {model_id}",
                partial(self._client.list_logged_model_artifacts, model_id, folder),
            )
            for info in listed:
                if info.is_dir:
                    pending.append(info.path)
                else:
                    yield str(info.path)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
