"""The MLflow drop-in: unmodified MLflow code logs into the spool through a ``spool:`` URI.

    export MLFLOW_TRACKING_URI=spool:///scratch/$USER/project/data/runs
    python train.py        # mlflow.start_run(), mlflow.log_metric(), MlflowClient(), ...
    ff-sync                # later, anywhere that sees the spool

MLflow finds :class:`~formula_foundry.dropin.store.SpoolStore` through its
``mlflow.tracking_store`` entry point, and the runs' files through
:class:`~formula_foundry.dropin.artifacts.SpoolArtifactRepository` (``mlflow.artifact_repository``).
Every write becomes the same spool events, through the same writer and validation rules, as
:mod:`formula_foundry.tracking`; a file's bytes go into the artifact store. ``ff-sync`` replays
them like any other run. Reads are answered from the spool. See docs/mlflow-dropin.md.

Only :mod:`~formula_foundry.dropin.store`, :mod:`~formula_foundry.dropin.artifacts` and
:mod:`~formula_foundry.dropin.registry` import MLflow; the rest (URIs, experiment ids, the runs
this process logs, their files, reading runs back) does not.
"""
