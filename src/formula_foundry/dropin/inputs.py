"""A ``spool:`` run's inputs: the datasets and logged models it used (MLflow's ``log_inputs``).

``mlflow.log_input``, ``mlflow.log_inputs`` and autolog's training datasets come here through
the store: one ``inputs`` event in the run's spool per call, checked with MLflow's rules and
the payload reader the sync uses (:func:`formula_foundry.sync.engine.inputs.run_inputs`), so
the sync never meets an input MLflow would refuse. ``ff-sync`` replays it with MLflow's own
``log_inputs``. A model input must be a model of the spool: the sync maps its id to the
destination model's, and a model the spool does not hold has no destination model.
"""

from __future__ import annotations

from typing import Any, Final

from formula_foundry.dropin.models import ModelBook
from formula_foundry.dropin.run_book import RunBook
from formula_foundry.errors import ValidationError
from formula_foundry.sync.engine.inputs import dataset_record, run_inputs
from formula_foundry.tracking.events import FORMAT_VERSION, K_INPUTS
from formula_foundry.tracking.spool_reader import Event
from formula_foundry.tracking.spool_writer import now_ms

_V: Final = FORMAT_VERSION


def log_inputs(
    runs: RunBook,
    models: ModelBook,
    run_id: str,
    datasets: list[dict[str, Any]],
    model_ids: list[object],
) -> None:
    """Write the run's ``inputs`` event (nothing for an empty call, as MLflow writes nothing)."""
    if not datasets and not model_ids:
        return
    ids = [models.get(m).model_id for m in model_ids]  # not in the spool: ArtifactNotFound
    t = now_ms()
    record: dict[str, Any] = {"v": _V, "s": 0, "t": t, "k": K_INPUTS}
    if datasets:
        record["datasets"] = datasets
    if ids:
        record["models"] = ids
    try:
        # The sync's own reading: what it would quarantine is refused here, nothing written.
        checked, _ = run_inputs(Event(0, t, K_INPUTS, record, 0, 0, 0))
    except Exception as exc:
        raise ValidationError(f"log_inputs of run {run_id}: {exc}") from None
    if datasets:
        record["datasets"] = [dataset_record(d) for d in checked]
    live = runs.live(run_id)
    with live.lock:
        live.writer.append(record)
        live.writer.flush()  # buffered durability too: a returned call is on disk
        for ds in checked:
            live.state.datasets.setdefault((ds.name, ds.digest), ds)
        live.state.model_inputs.update(ids)
