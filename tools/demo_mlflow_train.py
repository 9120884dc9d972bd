"""An ordinary MLflow training script: nothing in it knows about formula-foundry.

The demo runs it with ``MLFLOW_TRACKING_URI=spool:`` so it logs into the spool (the MLflow
drop-in, docs/mlflow-dropin.md); ``ff-sync`` then replays it like any tracker run.
"""

import math

import mlflow

mlflow.set_experiment("dropin-demo")
with mlflow.start_run(run_name="train-mlp"):
    mlflow.log_params({"lr": 0.01, "hidden": 64, "optimizer": "adam"})
    for epoch in range(20):
        loss = 2.0 * math.exp(-0.2 * epoch) + 0.05
        mlflow.log_metrics({"train_loss": loss, "val_loss": loss * 1.1}, step=epoch)
    mlflow.set_tag("stage", "demo")
