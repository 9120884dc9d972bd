"""``SpoolStore``: MLflow's tracking-store interface, written into the spool and read from it.

MLflow builds it for ``spool:`` URIs (entry point ``mlflow.tracking_store``). What it does not
support raises an :class:`~mlflow.exceptions.MlflowException` naming the call and ``ff-sync``;
it never pretends to have stored something.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Final, TypeVar

from mlflow.entities import (
    Dataset,
    DatasetInput,
    Experiment,
    InputTag,
    LifecycleStage,
    LoggedModel,
    LoggedModelInput,
    LoggedModelOutput,
    LoggedModelParameter,
    LoggedModelStatus,
    LoggedModelTag,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunInputs,
    RunTag,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.search_utils import SearchExperimentsUtils, SearchUtils

from formula_foundry.dropin.experiments import Experiment as SpoolExperiment
from formula_foundry.dropin.experiments import experiment_id
from formula_foundry.dropin.inputs import log_inputs
from formula_foundry.dropin.models import ModelState, model_book
from formula_foundry.dropin.points import stored
from formula_foundry.dropin.run_book import run_book
from formula_foundry.dropin.spool_runs import RunState, metric_history, run_ids
from formula_foundry.dropin.spool_uri import canonical_uri, spool_root
from formula_foundry.errors import (
    ArtifactNotFound,
    ConfigError,
    FormulaFoundryError,
    RunStateError,
    SpoolWriteError,
    ValidationError,
)
from formula_foundry.tracking.model_events import ModelMetric, metric_dataset

T = TypeVar("T")
_DATASET_FIELDS: Final = ("name", "digest", "source_type", "source", "schema", "profile")
_SUPPORTED: Final = (
    "experiments (create, get, get by name, search), runs (create, get, search by experiment, "
    "filter and order, update status and name), log_batch and everything that uses it, "
    "log_batch_async, metric history, logged models of a run, log_inputs"
)


def mlflow_error(exc: FormulaFoundryError) -> MlflowException:
    """Our error as the MlflowException MLflow's own stores raise for the same fault."""
    if isinstance(exc, ValidationError | ConfigError):
        return MlflowException(str(exc), INVALID_PARAMETER_VALUE)
    if isinstance(exc, RunStateError | ArtifactNotFound):
        return MlflowException(str(exc), RESOURCE_DOES_NOT_EXIST)
    if isinstance(exc, SpoolWriteError):
        return MlflowException(str(exc), INTERNAL_ERROR)
    return MlflowException(str(exc), INTERNAL_ERROR)


def _mlflow_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Our errors reach MLflow code as the MlflowException MLflow's own stores raise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except FormulaFoundryError as exc:
            raise mlflow_error(exc) from None

    return wrapper


def _unsupported(name: str) -> Callable[..., Any]:
    def refuse(self: SpoolStore, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(
            f"{name}() is not available on a spool ({self.uri}): a spool records what runs "
            f"log ({_SUPPORTED}). Run ff-sync to replay the spool into your MLflow tracking "
            f"store, then call {name}() with MLFLOW_TRACKING_URI set to that store",
            INVALID_PARAMETER_VALUE,
        )

    refuse.__name__ = name
    return refuse


def _skip_spark_probe() -> None:
    """Make MLflow's check for an active Spark session cheap where PySpark is not installed.

    Each ``MlflowClient`` (the fluent API builds two per ``log_metric``) resolves a registry URI
    and, when none is set, tries ``import pyspark``: a failed import walks ``sys.path`` and costs
    most of a fluent call. Recording the module as absent answers that import at once, exactly
    as before (it is not installed). Nothing changes where PySpark is installed.
    """
    if "pyspark" not in sys.modules and importlib.util.find_spec("pyspark") is None:
        sys.modules["pyspark"] = None  # type: ignore[assignment]
        sys.modules["pyspark.sql"] = None  # type: ignore[assignment]


def _resolve_registry(uri: str) -> None:
    """Where the user chose no model registry, the spool's is the one (as MLflow would pick for
    this tracking URI): resolved once here, not twice per fluent call.

    Only while the process's tracking URI is a spool and nothing else was chosen; not exported
    to child processes (``mlflow.set_registry_uri`` would set ``MLFLOW_REGISTRY_URI``). A process
    that later logs elsewhere and registers models sets its registry URI, as it would anyway.
    """
    import mlflow.tracking._model_registry.utils as registry
    from mlflow.environment_variables import MLFLOW_REGISTRY_URI
    from mlflow.tracking._tracking_service.utils import get_tracking_uri

    if registry._registry_uri is None and not MLFLOW_REGISTRY_URI.get():
        current = get_tracking_uri()
        if isinstance(current, str) and current.startswith("spool:"):
            setattr(registry, "_registry_uri", current)  # noqa: B010 - typed None in MLflow


def _fields_layout() -> type[Metric] | None:
    """MLflow's ``Metric`` if its ``key``, ``value``, ``timestamp``, ``step`` are plain
    properties over ``_key``, ``_value``, ``_timestamp``, ``_step`` (then the write paths read
    those directly: four property calls cost as much as the rest of checking a point); None if
    this MLflow's differs (then the properties are used)."""
    probe = Metric(object(), object(), object(), object())  # type: ignore[arg-type]
    for name in ("key", "value", "timestamp", "step"):
        if not isinstance(Metric.__dict__.get(name), property):
            return None
        if getattr(probe, name) is not getattr(probe, f"_{name}", None):
            return None
    return Metric


_METRIC: Final = _fields_layout()


def _rows(metrics: list[Metric]) -> list[tuple[object, object, object, object]]:
    cls = _METRIC
    return [
        (m._key, m._value, m._timestamp, m._step)
        if m.__class__ is cls
        else (m.key, m.value, m.timestamp, m.step)
        for m in metrics
    ]


def _one_group(metrics: list[Metric]) -> tuple[int, int, dict[str, float]] | None:
    """The points as ``log_metrics`` sends them — one timestamp and one step, distinct keys,
    float values — as (time, step, {key: value}); None otherwise."""
    cls = _METRIC
    first = metrics[0]
    if first.__class__ is not cls:
        return None
    t, s = first._timestamp, first._step
    if t.__class__ is not int or s.__class__ is not int:
        return None
    d: dict[str, float] = {}
    for m in metrics:
        value, mt, ms = m._value, m._timestamp, m._step
        if m.__class__ is not cls or value.__class__ is not float:
            return None
        # log_metrics gives every point the same two objects; compare only other ints
        if mt is not t and (mt.__class__ is not int or mt != t):
            return None
        if ms is not s and (ms.__class__ is not int or ms != s):
            return None
        d[m._key] = value
    return (t, s, d) if len(d) == len(metrics) else None


def _linked(metrics: list[Metric]) -> bool:
    """Whether a point is linked to a logged model (``model_id``)."""
    try:
        return any(m._model_id is not None for m in metrics)
    except AttributeError:  # not MLflow's Metric: its public fields
        return any(getattr(m, "model_id", None) is not None for m in metrics)


def _pairs(items: list[Param] | list[RunTag]) -> list[tuple[object, object]]:
    return [(i.key, i.value) for i in items]


class SpoolStore(AbstractStore):
    """The tracking store of a ``spool:`` URI."""

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None) -> None:
        super().__init__()
        from formula_foundry.config import load_settings

        try:
            root = spool_root(store_uri or "spool:")
            settings = load_settings()
        except FormulaFoundryError as exc:
            raise mlflow_error(exc) from None
        self.root = root
        self.uri = canonical_uri(root)
        # Shared with the artifact repositories of its runs: one writer per run and process.
        self._runs = run_book(root, settings.durability, settings.heartbeat_s)
        self._experiments = self._runs.experiments
        self._models = model_book(self._runs)
        _skip_spark_probe()
        with contextlib.suppress(Exception):  # an MLflow without these internals: only slower
            _resolve_registry(self.uri)

    # -- experiments -----------------------------------------------------------------------

    def _experiment(self, exp: SpoolExperiment) -> Experiment:
        return Experiment(
            exp.experiment_id,
            exp.name,
            f"{self.uri}/.experiments/{exp.experiment_id}",
            LifecycleStage.ACTIVE,
            tags=[],
            creation_time=exp.created,
            last_update_time=exp.created,
        )

    @_mlflow_errors
    def create_experiment(
        self, name: str, artifact_location: str | None = None, tags: Any = None
    ) -> str:
        if artifact_location:
            raise ValidationError(
                f"experiment {name!r}: artifact_location is chosen by the store ff-sync "
                "replays into; create the experiment without it"
            )
        if tags:
            raise ValidationError(
                f"experiment {name!r}: experiment tags are not recorded in a spool; set them "
                "after ff-sync"
            )
        exp, created = self._experiments.create(name)
        if not created:
            raise MlflowException(
                f"Experiment(name={name}) already exists.", RESOURCE_ALREADY_EXISTS
            )
        return exp.experiment_id

    @_mlflow_errors
    def get_experiment(self, experiment_id: str) -> Experiment:
        exp = self._experiments.by_id(str(experiment_id))
        if exp is None:
            raise MlflowException(
                f"No Experiment with id={experiment_id} exists in the spool {self.root}",
                RESOURCE_DOES_NOT_EXIST,
            )
        return self._experiment(exp)

    @_mlflow_errors
    def get_experiment_by_name(self, experiment_name: str) -> Experiment | None:
        exp = self._experiments.by_name(experiment_name)
        return None if exp is None else self._experiment(exp)

    @_mlflow_errors
    def search_experiments(
        self,
        view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int = SEARCH_MAX_RESULTS_DEFAULT,
        filter_string: str | None = None,
        order_by: list[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        if view_type == ViewType.DELETED_ONLY:
            return PagedList([], None)
        experiments = [self._experiment(e) for e in self._experiments.all()]
        filtered = SearchExperimentsUtils.filter(experiments, filter_string)
        ordered = SearchExperimentsUtils.sort(filtered, order_by or ["creation_time DESC"])
        page, token = SearchUtils.paginate(ordered, page_token, max_results)
        return PagedList(page, token)

    # -- runs ------------------------------------------------------------------------------

    def _run(self, state: RunState) -> Run:
        exp_id = experiment_id(state.experiment)
        info = RunInfo(
            run_id=state.run_id,
            experiment_id=exp_id,
            user_id=state.user,
            status=state.status,
            start_time=state.start_time,
            end_time=state.end_time,
            lifecycle_stage=LifecycleStage.ACTIVE,
            artifact_uri=f"{self.uri}/{state.run_id}/artifacts",
            run_name=state.name,
        )
        data = RunData(
            metrics=[
                Metric(key, stored(v) if v == v else v, t, step)
                for key, (step, t, v) in state.latest.items()
            ],
            params=[Param(k, v) for k, v in state.params.items()],
            tags=[RunTag(k, v) for k, v in state.tags.items()],
        )
        inputs = RunInputs(
            dataset_inputs=[
                DatasetInput(
                    Dataset(d.name, d.digest, d.source_type, d.source, d.schema, d.profile),
                    [InputTag(k, v) for k, v in d.tags],
                )
                for d in state.datasets.values()
            ],
            model_inputs=[LoggedModelInput(m) for m in sorted(state.model_inputs)],
        )
        return Run(info, data, inputs)

    def _state(self, run_id: str) -> RunState:
        state = self._runs.get(run_id)
        if state is None or not state.started:
            raise MlflowException(
                f"Run '{run_id}' not found in the spool {self.root}", RESOURCE_DOES_NOT_EXIST
            )
        return state

    @_mlflow_errors
    def create_run(
        self,
        experiment_id: str,
        user_id: str | None,
        start_time: int | None,
        tags: list[RunTag] | None,
        run_name: str | None,
    ) -> Run:
        exp = self._experiments.by_id(str(experiment_id))
        if exp is None:
            raise MlflowException(
                f"Could not create run under experiment with ID {experiment_id}: it is not in "
                f"the spool {self.root} (create it with mlflow.set_experiment(name) or "
                "mlflow.create_experiment on this spool)",
                RESOURCE_DOES_NOT_EXIST,
            )
        tag_dict = {t.key: t.value for t in tags or ()}
        state = self._runs.create(
            exp, user_id, start_time, tag_dict, run_name, _generate_random_name
        )
        return self._run(state)

    @_mlflow_errors
    def get_run(self, run_id: str) -> Run:
        return self._run(self._state(run_id))

    @_mlflow_errors
    def update_run_info(
        self, run_id: str, run_status: Any, end_time: int | None, run_name: str | None
    ) -> Any:
        from mlflow.entities import RunStatus

        status = run_status if isinstance(run_status, str) else RunStatus.to_string(run_status)
        # One read of the spool for a run this process has not opened yet (a resumed run's
        # spool can be large); a run that is not there is RESOURCE_DOES_NOT_EXIST.
        live = self._runs.live(run_id, resume=status == "RUNNING")
        if run_name:
            self._runs.rename(run_id, run_name)
        if status != "RUNNING":
            self._runs.end(run_id, status, end_time)
        return self._run(live.state).info

    @_mlflow_errors
    def get_metric_history(
        self,
        run_id: str,
        metric_key: str,
        max_results: int | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        self._runs.flush(run_id)  # a run not in the spool has no points, as in MLflow
        points = [
            Metric(metric_key, stored(v) if v == v else v, t, step, run_id=run_id)
            for step, t, v in metric_history(self.root, run_id, metric_key)
        ]
        if max_results is None:
            return PagedList(points, None)
        page, token = SearchUtils.paginate(points, page_token, max_results)
        return PagedList(page, token)

    @_mlflow_errors
    def _search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str | None,
        run_view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Run], str | None]:
        if run_view_type == ViewType.DELETED_ONLY:
            return [], None
        names = set()
        for exp_id in experiment_ids:
            exp = self._experiments.by_id(str(exp_id))
            if exp is not None:
                names.add(exp.name)
        runs = [self._run(s) for s in self._states() if s.experiment in names]
        filtered = SearchUtils.filter(runs, filter_string)
        ordered = SearchUtils.sort(filtered, order_by)
        page, token = SearchUtils.paginate(ordered, page_token, max_results)
        return page, token

    def _states(self) -> Iterator[RunState]:
        for run_id in run_ids(self.root):
            state = self._runs.get(run_id)
            if state is not None and state.started:
                yield state

    # -- writes ----------------------------------------------------------------------------

    # The write paths catch our errors themselves: the decorator's call through *args and
    # **kwargs would cost as much as a quarter of the store's work per log_metric.

    def log_metric(self, run_id: str, metric: Metric) -> None:
        try:
            if metric.__class__ is _METRIC and metric._model_id is None:
                self._runs.log_metric(
                    run_id, metric._key, metric._value, metric._timestamp, metric._step
                )
            elif _linked([metric]):
                self.log_batch(run_id, [metric], [], [])
            else:
                m = metric
                self._runs.log_metric(run_id, m.key, m.value, m.timestamp, m.step)
        except FormulaFoundryError as exc:
            raise mlflow_error(exc) from None

    def log_batch(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
    ) -> None:
        try:
            if metrics and _linked(metrics):
                # The run's points as for any batch, then the model's (checked by then; their
                # datasets before anything is written, as the run's points cannot check them).
                rows, ps, ts = _rows(metrics), _pairs(params), _pairs(tags)
                by_model = _model_points(metrics)
                self._runs.log_batch(run_id, rows, ps, ts)
                for model_id, points in by_model.items():
                    self._models.log_metrics(run_id, model_id, points)
                return
            if not params and not tags and metrics:
                if len(metrics) == 1:
                    self.log_metric(run_id, metrics[0])
                    return
                group = _one_group(metrics)
                if group is not None and self._runs.log_group(run_id, *group):
                    return
            self._runs.log_batch(
                run_id,
                _rows(metrics),
                [(p.key, p.value) for p in params],
                [(t.key, t.value) for t in tags],
            )
        except FormulaFoundryError as exc:
            raise mlflow_error(exc) from None

    def log_batch_async(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
    ) -> RunOperations:
        # MLflow's queue holds events in memory and loses them on a kill; the spool write is
        # as fast, so it is done before the call returns. Errors reach the caller as MLflow's
        # would: through the returned operation.
        future: Future[None] = Future()
        try:
            self.log_batch(run_id, metrics, params, tags)
        except Exception as exc:  # handed to the caller through the future
            future.set_exception(exc)
        else:
            future.set_result(None)
        return RunOperations([future])

    def flush_async_logging(self) -> None:
        return None

    def end_async_logging(self) -> None:
        return None

    def shut_down_async_logging(self) -> None:
        return None

    @_mlflow_errors
    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        from mlflow.utils.validation import _validate_dataset_inputs

        if datasets is not None and not isinstance(datasets, list):  # as MLflow's stores
            raise TypeError(f"Argument 'datasets' should be a list, got '{type(datasets)}'")
        if datasets:
            _validate_dataset_inputs(datasets)
        self._state(run_id)
        records = [
            {
                **{f: getattr(i.dataset, f) for f in _DATASET_FIELDS},
                "tags": {t.key: t.value for t in i.tags or ()},
            }
            for i in datasets or ()
        ]
        ids = [m.model_id for m in models or ()]
        log_inputs(self._runs, self._models, run_id, records, ids)

    # -- logged models (dropin/models.py) --------------------------------------------------

    def _model(self, state: ModelState) -> LoggedModel:
        metrics = [
            Metric(
                m.key, m.value, m.timestamp, m.step, model_id=state.model_id,
                dataset_name=m.dataset_name, dataset_digest=m.dataset_digest, run_id=state.run_id,
            )
            for m in state.metrics
        ]  # fmt: skip
        return LoggedModel(
            experiment_id=experiment_id(state.experiment),
            model_id=state.model_id,
            name=state.name,
            artifact_location=f"{self.uri}/{state.run_id}/models/{state.model_id}/artifacts",
            creation_timestamp=state.created,
            last_updated_timestamp=state.updated,
            model_type=state.model_type,
            source_run_id=state.run_id,
            status=LoggedModelStatus(state.status),
            tags=dict(state.tags),
            params=dict(state.params),
            metrics=metrics,
        )

    @_mlflow_errors
    def create_logged_model(
        self,
        experiment_id: str,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: list[LoggedModelTag] | None = None,
        params: list[LoggedModelParameter] | None = None,
        model_type: str | None = None,
    ) -> LoggedModel:
        from mlflow.utils.validation import _validate_logged_model_name

        _validate_logged_model_name(name)
        exp = self._experiments.by_id(str(experiment_id))
        if exp is None:
            raise MlflowException(
                f"Could not create a logged model under experiment with ID {experiment_id}: "
                f"it is not in the spool {self.root}",
                RESOURCE_DOES_NOT_EXIST,
            )
        state = self._models.create(
            exp,
            source_run_id,
            name or _generate_random_name(),
            model_type,
            [(p.key, p.value) for p in params or ()],
            [(t.key, t.value) for t in tags or ()],
        )
        return self._model(state)

    @_mlflow_errors
    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> LoggedModel:
        return self._model(self._models.get(model_id))

    @_mlflow_errors
    def finalize_logged_model(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        name = status.name if isinstance(status, LoggedModelStatus) else str(status)
        return self._model(self._models.finalize(model_id, name))

    @_mlflow_errors
    def log_logged_model_params(self, model_id: str, params: list[LoggedModelParameter]) -> None:
        self._models.log_params(model_id, [(p.key, p.value) for p in params])

    @_mlflow_errors
    def set_logged_model_tags(self, model_id: str, tags: list[LoggedModelTag]) -> None:
        self._models.set_tags(model_id, [(t.key, t.value) for t in tags])

    @_mlflow_errors
    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        self._models.delete_tag(model_id, key)

    @_mlflow_errors
    def log_outputs(self, run_id: str, models: list[LoggedModelOutput]) -> None:
        self._state(run_id)
        for output in models:
            self._models.log_output(run_id, output.model_id, output.step)

    @_mlflow_errors
    def search_logged_models(
        self,
        experiment_ids: list[str],
        filter_string: str | None = None,
        datasets: list[dict[str, Any]] | None = None,
        max_results: int | None = None,
        order_by: list[dict[str, Any]] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        # MLflow also looks for models whenever it lists or downloads a run's artifacts by
        # path (``runs:/<id>/<path>``): answered from the spool, filtered as its stores do.
        from mlflow.utils.search_utils import SearchLoggedModelsUtils as Search

        names = set()
        for exp_id in experiment_ids:
            exp = self._experiments.by_id(str(exp_id))
            if exp is not None:
                names.add(exp.name)
        models = [self._model(s) for s in self._models.search(names)]
        filtered = Search.filter_logged_models(models, filter_string, datasets)
        ordered = Search.sort(filtered, order_by)
        page, token = Search.paginate(ordered, page_token, max_results or 100)
        return PagedList(page, token)

    @_mlflow_errors
    def delete_tag(self, run_id: str, key: str) -> None:
        self._state(run_id)
        self._runs.delete_tag(run_id, key)


# AbstractStore methods whose base implementation works on a spool: they only call methods the
# spool store implements (log_metric → log_batch, search_runs → _search_runs, ...).
INHERITED: Final = frozenset(
    {
        "filter_active_experiment_ids",
        "get_metric_history_bulk_interval",
        "get_metric_history_bulk_interval_from_steps",
        "log_metric",
        "log_metric_async",
        "log_param",
        "log_param_async",
        "search_runs",
        "set_tag",
        "set_tag_async",
    }
)


def _model_points(metrics: list[Metric]) -> dict[str, list[ModelMetric]]:
    """The points linked to a model (``log_metric(..., model_id=...)``, ``log_model``), by
    model, their datasets checked: the run gets them as MLflow's stores give them to it, each
    model its own events."""
    by_model: dict[str, list[ModelMetric]] = {}
    for m in metrics:
        if m.model_id is not None:
            dataset = metric_dataset(m.dataset_name, m.dataset_digest) or (None, None)
            point = ModelMetric(m.key, m.value, m.timestamp, m.step, *dataset)
            by_model.setdefault(m.model_id, []).append(point)
    return by_model


def _fill_unsupported() -> None:
    """Every other public method of MLflow's store refuses clearly (the base class would raise
    a bare NotImplementedError, or silently do nothing)."""
    for name in dir(AbstractStore):
        if name.startswith("_") and name not in getattr(AbstractStore, "__abstractmethods__", ()):
            continue
        if name in SpoolStore.__dict__ or name in INHERITED:
            continue
        if callable(getattr(AbstractStore, name, None)):
            setattr(SpoolStore, name, _unsupported(name))
    setattr(SpoolStore, "__abstractmethods__", frozenset())  # noqa: B010 - mypy knows no such attribute


_fill_unsupported()
with contextlib.suppress(Exception):
    del _fill_unsupported
