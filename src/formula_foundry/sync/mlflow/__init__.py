"""The MLflow adapter: the only part of the sync that imports MLflow or SQLAlchemy.

:mod:`.client_sink` implements the engine's :class:`~formula_foundry.sync.engine.sink.Sink`
with MLflow's own client; :mod:`.sql_bulk` writes metric batches straight into a SQL store
whose schema it knows; :mod:`.rest_batch` encodes one request per batch for an
``mlflow server``; :mod:`.store_access` turns MLflow's errors into the sync's; :mod:`.identity`
keeps the destination's identity tags; :mod:`.internals` holds the private MLflow APIs reached
into, each guarded; :mod:`.lean_imports` keeps MLflow's data-science dependencies out of the
process; :mod:`.snapshot` reads a store back (``ff-sync verify`` and the tests).
"""
