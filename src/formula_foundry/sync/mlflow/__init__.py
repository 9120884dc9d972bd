"""The MLflow adapter: the only part of the sync that imports MLflow, SQLAlchemy or a driver.

:mod:`.client_sink` implements the engine's :class:`~formula_foundry.sync.engine.sink.Sink`
with MLflow's own client; for a SQL store whose schema it knows, :mod:`.sql_sink` writes runs,
experiments, params, tags and statuses (:mod:`.sql_runs`) and metric batches (:mod:`.sql_bulk`)
by SQL without importing MLflow (:mod:`.sql_store` opens the store); :mod:`.rest_batch` encodes
one request per batch for an ``mlflow server``; :mod:`.store_access` turns MLflow's errors into
the sync's; :mod:`.identity` keeps the destination's identity tags; :mod:`.internals` holds the
private MLflow APIs reached into, each guarded; :mod:`.lean_imports` keeps MLflow's
data-science dependencies out of the process; :mod:`.snapshot` reads a store back
(``ff-sync verify`` and the tests).
"""
