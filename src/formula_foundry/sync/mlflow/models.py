"""Logged models in the MLflow destination: the model calls of the client sink.

Every call is idempotent, as the replay needs (sync/engine/models.py):

* a model is found by its tag ``ff.model_id`` (``search_logged_models``) before one is
  created; ``create_logged_model`` writes that tag, the params and the other tags in the
  model's own transaction, with the destination run as its source;
* params are write-once in MLflow (a second insert fails): only the ones the model lacks are
  sent; tags are upserts; a tag already deleted is done; finalising again sets the same status;
* metric points linked to the model are idempotent in MLflow's store (it skips rows it has);
  the run lists a model among its outputs only if it does not yet;
* a run's inputs (``log_inputs``): MLflow's store looks datasets up by (experiment, name,
  digest) and inputs by (dataset, run) before inserting, and merges a model input on its key;
* files go up through MLflow's client (``log_model_artifact``) into the model's artifact
  location, each through a link carrying its name, and the model's listing must show each at
  its full size before the call returns. In a local artifact root, what an upload killed
  midway left (MLflow's hidden temporary file) is removed first.

MLflow's classes come from the client sink, which imports MLflow: this module does not.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

from formula_foundry.errors import FormulaFoundryError
from formula_foundry.sync.engine.refusals import local_refusal, quoted
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    MetricRow,
    ModelSpec,
    RecordRejected,
    RunDataset,
)
from formula_foundry.sync.mlflow.artifact_upload import check_listed, local_root
from formula_foundry.sync.mlflow.local_upload import sweep_leftovers
from formula_foundry.tracking.events import MODEL_ID_TAG

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.client_sink import MlflowSink

T = TypeVar("T")


class ModelWriter:
    """The :class:`~formula_foundry.sync.engine.sink.ModelSink` calls of one MLflow sink."""

    def __init__(self, sink: MlflowSink, client: Any, entities: Any) -> None:
        # MLflow's entity classes come from the client sink (the module that imports MLflow).
        self.sink, self.client, self._entities = sink, client, entities
        self._Metric, self._Output = entities.Metric, entities.LoggedModelOutput

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.sink.call(what, fn)

    def experiment_ids(self, name: str | None, create: bool = False) -> list[str]:
        """The id of experiment ``name`` (created if ``create``), or of every one for None
        (deleted ones too), through the sink's own cache of them."""
        sink = self.sink
        if name is None:
            if sink._exp_ids is None:
                sink._exp_ids = sink._all_experiment_ids()
            return list(sink._exp_ids)
        found = sink._experiment_id(name, create)
        return [] if found is None else [found]

    def find_model(self, spool_model_id: str, experiment: str | None) -> str | None:
        value = spool_model_id.replace("\\", "\\\\").replace("'", "\\'")
        query = f"tags.`{MODEL_ID_TAG}` = '{value}'"
        first = self.experiment_ids(experiment) if experiment else []
        for ids in (first, self.experiment_ids(None)):
            found: list[Any] = []
            for i in range(0, len(ids), 100):
                found.extend(
                    self._call(
                        f"look up logged model {spool_model_id}",
                        partial(
                            self.client.search_logged_models,
                            ids[i : i + 100],
                            filter_string=query,
                            max_results=2,
                        ),
                    )
                )
            if found:
                # Two would be a create whose answer was lost over HTTP: the same one always.
                return str(min(m.model_id for m in found))
        return None

    def create_model(self, spec: ModelSpec) -> str:
        exp_id = self.experiment_ids(spec.experiment, create=True)[0]
        model = self._call(
            f"create logged model {spec.spool_model_id}",
            lambda: self.client.create_logged_model(
                exp_id,
                name=spec.name,
                source_run_id=spec.mlflow_run_id,
                tags=spec.creation_tags(),
                params=dict(spec.params) or None,
                model_type=spec.model_type,
            ),
        )
        return str(model.model_id)

    def log_model_params(self, model_id: str, params: Sequence[tuple[str, str]]) -> None:
        model = self._call(
            f"read logged model {model_id}", lambda: self.client.get_logged_model(model_id)
        )
        have: dict[str, str] = dict(model.params)
        clash = [(k, v) for k, v in params if k in have and have[k] != v]
        if clash:
            key, value = clash[0]
            raise RecordRejected(
                f"{self.sink.description}: logged model {model_id} has param {quoted(key)} = "
                f"{quoted(have[key])}, not {quoted(value)} (a model's params are write-once)"
            )
        missing = {k: v for k, v in params if k not in have}
        if missing:
            self._call(
                f"log params of logged model {model_id}",
                lambda: self.client.log_model_params(model_id, missing),
            )

    def set_model_tags(self, model_id: str, tags: Sequence[tuple[str, str]]) -> None:
        self._call(
            f"tag logged model {model_id}",
            lambda: self.client.set_logged_model_tags(model_id, dict(tags)),
        )

    def delete_model_tag(self, model_id: str, key: str) -> None:
        client = self.client

        def attempt() -> None:
            try:
                client.delete_logged_model_tag(model_id, key)
            except Exception as exc:
                # Deleted by an earlier pass that died before recording it: done already.
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                if key in client.get_logged_model(model_id).tags:
                    raise

        self._call(f"delete tag {quoted(key)} of logged model {model_id}", attempt)

    def log_model_metrics(
        self,
        mlflow_run_id: str,
        model_id: str,
        metrics: Sequence[MetricRow],
        dataset: tuple[str, str] | None = None,
    ) -> None:
        # MLflow keeps the dataset's name and digest on the model's rows only
        # (logged_model_metrics); the run's metrics table has no room for them.
        name, digest = dataset or (None, None)
        points = [
            self._Metric(k, v, t, s, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v, t, s in metrics
        ]
        self._call(
            f"log metrics of logged model {model_id} to run {mlflow_run_id}",
            lambda: self.client.log_batch(mlflow_run_id, metrics=points),
        )

    def log_model_output(self, mlflow_run_id: str, model_id: str, step: int) -> None:
        client = self.client

        def attempt() -> None:
            outputs = client.get_run(mlflow_run_id).outputs
            listed = getattr(outputs, "model_outputs", None) or []
            if not any(o.model_id == model_id for o in listed):
                client.log_outputs(mlflow_run_id, [self._Output(model_id, step)])

        self._call(
            f"list logged model {model_id} among the outputs of run {mlflow_run_id}", attempt
        )

    def finalize_model(self, model_id: str, status: str) -> None:
        self._call(
            f"finalize logged model {model_id}",
            lambda: self.client.finalize_logged_model(model_id, status),
        )

    def log_inputs(
        self, mlflow_run_id: str, datasets: Sequence[RunDataset], model_ids: Sequence[str]
    ) -> None:
        e = self._entities
        inputs = [
            e.DatasetInput(
                e.Dataset(d.name, d.digest, d.source_type, d.source, d.schema, d.profile),
                [e.InputTag(k, v) for k, v in d.tags],
            )
            for d in datasets
        ]
        models = [e.LoggedModelInput(m) for m in model_ids]
        client = self.client

        def attempt() -> None:
            try:
                client.log_inputs(mlflow_run_id, inputs or None, models or None)
            except Exception as exc:
                # Two writers adding the same dataset at once (a parallel pass, runs sharing
                # training data): the loser's insert fails on the dataset's key. The call is
                # idempotent, so once more finds the winner's row.
                if getattr(exc, "error_code", None) != "INTERNAL_ERROR":
                    raise
                client.log_inputs(mlflow_run_id, inputs or None, models or None)

        what = f"log {len(inputs)} datasets and {len(models)} models as inputs of run"
        self._call(f"{what} {mlflow_run_id}", attempt)

    # -- files -----------------------------------------------------------------------------

    def upload_model_artifacts(
        self, model_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        model = self._call(
            f"read logged model {model_id}", lambda: self.client.get_logged_model(model_id)
        )
        self._remove_leftovers(
            str(model.artifact_location),
            model.source_run_id,
            {r.path.rpartition("/")[0] for r, _ in files},
        )
        rejected: list[tuple[ArtifactRef, str]] = []
        sent: list[ArtifactRef] = []
        with tempfile.TemporaryDirectory(prefix="ff-model-upload-") as tmp:
            for n, (ref, obj) in enumerate(files):
                # MLflow names an uploaded file after the local one; objects are named by
                # digest: each goes up through a link carrying its name, one folder per file.
                folder, _, name = ref.path.rpartition("/")
                link = Path(tmp, str(n), name)
                link.parent.mkdir()
                link.symlink_to(obj)
                why = self._upload_one(model_id, ref, str(link), folder or None)
                if why is None:
                    sent.append(ref)
                else:
                    rejected.append((ref, why))
        self._check_uploaded(model_id, sent)
        return rejected

    def _upload_one(
        self, model_id: str, ref: ArtifactRef, local: str, folder: str | None
    ) -> str | None:
        what = f"upload {quoted(ref.path)} to logged model {model_id}"
        try:
            self.client.log_model_artifact(model_id, local, folder)
        except FormulaFoundryError:
            raise
        except Exception as exc:
            local_why = local_refusal(exc)
            if local_why is not None:
                return (
                    f"{self.sink.description} cannot store file {quoted(ref.path)} of logged "
                    f"model {model_id}: {local_why}"
                )
            err = self.sink.classify(exc, what)
            if err is None:
                raise
            raise err from exc
        return None

    def _check_uploaded(self, model_id: str, sent: Sequence[ArtifactRef]) -> None:
        check_listed(
            sent,
            lambda folder: self._call(
                f"list the files of logged model {model_id}",
                partial(self.client.list_logged_model_artifacts, model_id, folder or None),
            ),
            f"{self.sink.description}: file {{path}} of logged model {model_id}",
        )

    def _remove_leftovers(self, location: str, run_id: str | None, folders: set[str]) -> None:
        """In a local artifact root, remove MLflow's temporary files an upload killed midway
        left in these folders of the model (only ff-sync writes into a synced model)."""
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file") or not run_id:
            return
        run_root = local_root(self.sink, run_id)
        if run_root is None:
            return  # the run's artifacts are not local: neither are the model's
        root = Path(unquote(parsed.path) if parsed.scheme else location)
        for folder in folders:
            sweep_leftovers(root / folder if folder else root, run_root.prefix)
