"""Real MLflow integrations, unmodified, through ``spool:`` (issue 12, "real integrations").

Each test writes a tiny training script that uses an integration with its default settings
(CPU, a few steps, seconds of work) and runs it twice at once (``run_both``): straight into
MLflow's SQLite store and into a spool, which ``ff-sync`` replays into a fresh store. The two
stores must hold the same runs, names, statuses, params, tags and metric points (keys, steps,
and values wherever training is deterministic with a seed).

What differs between two runs of one script is listed here, each with its reason, and only
that is left out of the comparison: metric values of wall-clock origin (durations,
throughput, timestamps, process ids, the machine's load) keep their keys and steps.

Two differences the integrations found (context tags on runs made by
``MlflowClient.create_run``, a random name drawn for a named run) are fixed; the tests at the
end pin them.

The integrations need packages of their own (extras ``integrations``: psutil, Lightning, Ray
Tune; ``integrations-hf``: transformers); a test whose package is missing is skipped and says
which extra to install.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.dropin._compare import diff, dump
from tests.dropin.conftest import Ways, run_both

EXTRA = "pip install -e '.[integrations]'"
EXTRA_HF = "pip install -e '.[integrations-hf]'"  # transformers: heavier, not in dev
TIMEOUT = 420  # seconds for one script (two run at once on two cores; Ray starts a cluster)

# MLflow's system metrics: every value is a reading of the machine (CPU, memory, disk,
# network) at a wall-clock moment; how many samples fit in the run depends on its speed.
SYSTEM_PREFIX = "system/"

# transformers' Trainer: the closing `log` carries wall-clock measures of the training.
HF_VOLATILE = {
    "train_runtime": "seconds the training took",
    "train_samples_per_second": "throughput: samples / train_runtime",
    "train_steps_per_second": "throughput: steps / train_runtime",
}

# Ray Tune: every reported result carries Tune's own bookkeeping of time and process.
RAY_VOLATILE = {
    "timestamp": "wall-clock time of the report (seconds since 1970)",
    "time_this_iter_s": "seconds the iteration took",
    "time_total_s": "seconds since the trial started",
    "time_since_restore": "seconds since the trial (re)started",
    "pid": "process id of the trial's worker",
}

# Ray names a trial <trainable>_<5 random hex digits of the Tune run>_<trial index>.
RAY_TRIAL_ID = re.compile(r"_[0-9a-f]{5}_(\d{5})\b")
# ... and reports that id (a string) with each result: MLflowLoggerCallback logs what float()
# takes, so "64371_00001" becomes the metric 6437100001.0 when the hex digits happen to be
# decimal ones, and "a4371_00001" is no metric at all. Left out of the comparison.
RAY_RANDOM_METRICS = {"trial_id": "the trial's random id, a metric only when float() parses it"}


def _needs(module: str, reason: str) -> None:
    """Skip unless ``module`` is installed, without importing it into the test process: Ray
    and torch change ``sys.path`` and process state that later tests (in this process) see."""
    import importlib.util

    # Only the top-level package: looking for a submodule would import its parent.
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(reason)


# -- comparison ---------------------------------------------------------------------------------


def _blank_values(run: dict[str, Any], keys: Callable[[str], bool]) -> None:
    """Keep the steps of the metrics ``keys`` selects; write ``"~"`` for their values."""
    for key, points in run["metrics"].items():
        if keys(key):
            run["metrics"][key] = sorted([(p[0], "~") for p in points], key=repr)
    for key, point in run["latest"].items():
        if keys(key):
            run["latest"][key] = (point[0], "~")


def normalised(
    db: Path,
    *,
    volatile: Mapping[str, str] = {},
    rename: Callable[[str], str] = lambda name: name,
    drop_tags: tuple[str, ...] = (),
    drop_metrics: Mapping[str, str] = {},
) -> dict[str, Any]:
    """``dump(db)`` with the values of the ``volatile`` metrics blanked, each run's name (and
    tags) passed through ``rename``, the tags ``drop_tags`` and the metrics ``drop_metrics``
    left out."""
    raw = dump(db)
    out: dict[str, Any] = {"experiments": raw.pop("experiments")}
    for key, run in raw.items():
        _blank_values(run, lambda k: k in volatile)
        for name in ("metrics", "latest"):
            run[name] = {k: v for k, v in run[name].items() if k not in drop_metrics}
        run["tags"] = {k: rename(v) for k, v in run["tags"].items() if k not in drop_tags}
        out[rename(key)] = run
    return out


def assert_same(direct: dict[str, Any], synced: dict[str, Any]) -> None:
    assert direct == synced, (
        "the stores differ (- straight into SQLite, + through the spool):\n" + diff(direct, synced)
    )


def prepared(ways: Ways, empty_store: Path) -> Ways:
    ways.start_from(empty_store)
    return ways


# -- MLflow's system metrics monitor (psutil) ---------------------------------------------------

SYSTEM_METRICS = """
import time

import mlflow

mlflow.enable_system_metrics_logging()
mlflow.set_system_metrics_sampling_interval(1)
mlflow.set_experiment("monitored")
with mlflow.start_run(run_name="three seconds"):
    mlflow.log_param("interval", 1)
    for step in range(3):
        mlflow.log_metric("progress", step / 2, step=step)
        time.sleep(1.2)
"""


def _system_steps(run: dict[str, Any]) -> dict[str, list[int]]:
    return {
        k: sorted(p[0] for p in points)
        for k, points in run["metrics"].items()
        if k.startswith(SYSTEM_PREFIX)
    }


def test_system_metrics_monitor(ways: Ways, empty_store: Path) -> None:
    _needs("psutil", reason=f"MLflow's system metrics need psutil: {EXTRA}")
    prepared(ways, empty_store)
    run_both(SYSTEM_METRICS, ways.direct, ways.spooled, timeout=TIMEOUT)
    ways.sync()
    direct, synced = dump(ways.direct_db), dump(ways.synced_db)
    key = "monitored/three seconds"
    for name, run in (("direct", direct[key]), ("synced", synced[key])):
        steps = _system_steps(run)
        assert {
            "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage",
            "system/network_receive_megabytes",
        } <= set(steps), (name, sorted(steps))
        # One point per key and sample, steps counted from 0 without a gap; the latest is
        # the last sample.
        counts = {len(s) for s in steps.values()}
        assert len(counts) == 1, (name, steps)
        (n,) = counts
        for k, s in steps.items():
            assert s == list(range(n)), (name, k, s)
            assert run["latest"][k][0] == n - 1, (name, k, run["latest"][k])
        cpu = [p[1] for p in run["metrics"]["system/cpu_utilization_percentage"]]
        assert all(0 <= v <= 100 for v in cpu), (name, cpu)
        memory = [p[1] for p in run["metrics"]["system/system_memory_usage_megabytes"]]
        assert all(v > 0 for v in memory), (name, memory)
    # The monitor sampled the spool run repeatedly (it reads the run back after each sample).
    assert len(_system_steps(synced[key])["system/cpu_utilization_percentage"]) >= 2
    assert set(_system_steps(direct[key])) == set(_system_steps(synced[key]))
    for d in (direct, synced):  # the sample counts may differ: the rest must not
        for k in list(d[key]["metrics"]):
            if k.startswith(SYSTEM_PREFIX):
                del d[key]["metrics"][k], d[key]["latest"][k]
    assert direct[key]["metrics"]["progress"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert_same(direct, synced)


# -- PyTorch Lightning: MLFlowLogger ------------------------------------------------------------

LIGHTNING = """
import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

L.seed_everything(7)
torch.set_num_threads(1)


class Tiny(L.LightningModule):
    def __init__(self, lr=0.1, hidden=4):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


x = torch.randn(32, 3)
data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
trainer = L.Trainer(
    max_epochs=3,
    logger=MLFlowLogger(),
    log_every_n_steps=1,
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(Tiny(), data, data)
"""


def test_lightning_mlflow_logger(ways: Ways, empty_store: Path) -> None:
    _needs("lightning", reason=f"PyTorch Lightning is not installed: {EXTRA}")
    prepared(ways, empty_store)
    run_both(LIGHTNING, ways.direct, ways.spooled, timeout=TIMEOUT)
    ways.sync()
    direct, synced = normalised(ways.direct_db), normalised(ways.synced_db)
    # MLFlowLogger() names no run: MLflow draws a name from Python's `random`, which
    # seed_everything seeded, so both ways draw the same name.
    runs = [k for k in direct if k != "experiments"]
    assert len(runs) == 1 and runs[0].startswith("lightning_logs/"), runs
    run = direct[runs[0]]
    assert run["status"] == "FINISHED"
    assert run["params"] == {"lr": "0.1", "hidden": "4"}
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "epoch"} <= set(run["metrics"])
    assert len(run["metrics"]["train_loss_step"]) == 12  # 3 epochs of 4 batches
    assert_same(direct, synced)


# -- Hugging Face transformers: MLflowCallback -------------------------------------------------

TRANSFORMERS = """
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

set_seed(11)
torch.set_num_threads(1)
config = BertConfig(
    vocab_size=32,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
    num_labels=2,
)
model = BertForSequenceClassification(config)
ids = torch.randint(1, 32, (16, 6), generator=torch.Generator().manual_seed(3))
data = [{"input_ids": row, "labels": int(row.sum()) % 2} for row in ids]
args = TrainingArguments(
    output_dir="out",
    report_to="mlflow",
    run_name="tiny-bert",
    max_steps=6,
    per_device_train_batch_size=4,
    logging_steps=2,
    save_strategy="no",
    use_cpu=True,
    seed=11,
)
Trainer(model=model, args=args, train_dataset=data).train()
"""

# MLflowCallback reads these; a developer's shell must not change the callback's defaults.
HF_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_MLFLOW_INTEGRATION": "FALSE",
    "HF_MLFLOW_LOG_ARTIFACTS": "FALSE",
    "MLFLOW_NESTED_RUN": "FALSE",
    "MLFLOW_FLATTEN_PARAMS": "FALSE",
    "MLFLOW_TAGS": "",
    "MLFLOW_MAX_LOG_PARAMS": "",
}


def test_transformers_mlflow_callback(ways: Ways, empty_store: Path) -> None:
    _needs("transformers", reason=f"transformers is not installed: {EXTRA_HF}")
    _needs("accelerate", reason=f"transformers' Trainer needs accelerate: {EXTRA_HF}")
    prepared(ways, empty_store)
    run_both(TRANSFORMERS, ways.direct, ways.spooled, HF_ENV, timeout=TIMEOUT)
    ways.sync()
    direct = normalised(ways.direct_db, volatile=HF_VOLATILE)
    synced = normalised(ways.synced_db, volatile=HF_VOLATILE)
    run = direct["Default/tiny-bert"]
    assert run["status"] == "FINISHED"
    # TrainingArguments and the model's config, in batches of 100, logged asynchronously.
    assert len(run["params"]) > 100, len(run["params"])
    assert run["params"]["max_steps"] == "6" and run["params"]["hidden_size"] == "8"
    assert [p[0] for p in run["metrics"]["loss"]] == [2, 4, 6]
    assert set(HF_VOLATILE) | {"train_loss", "grad_norm", "learning_rate"} <= set(run["metrics"])
    assert_same(direct, synced)


# -- Ray Tune: MLflowLoggerCallback -------------------------------------------------------------

RAY_TUNE = """
import os

from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback


def train_fn(config):
    score = 0.0
    for step in range(4):
        score += config["lr"] * (step + 1)
        tune.report({"score": score, "half": score / 2})


tuner = tune.Tuner(
    train_fn,
    param_space={"lr": tune.grid_search([0.1, 0.2]), "width": 3},
    tune_config=tune.TuneConfig(max_concurrent_trials=1),
    run_config=tune.RunConfig(
        name="tiny",
        storage_path=os.path.abspath("ray_results"),
        callbacks=[MLflowLoggerCallback(experiment_name="tune")],
        verbose=0,
    ),
)
tuner.fit()
"""


def _processes_with_env(marker: str) -> list[int]:
    """Ids of the processes whose environment holds ``marker`` (``NAME=value``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker.encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def ray_envs() -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The environments of the two Ray scripts (direct, spooled): each starts a new local
    cluster (not one a user started) with its sessions in a short temporary folder of its own
    (Unix socket paths are limited to ~107 bytes), no usage report, no token file in ~/.ray.
    Ray's processes must end with the script: any left over is killed and fails the test."""
    tmp = tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    marker = ("FF_TEST_RAY", tmp)
    envs = tuple(
        {
            "RAY_ADDRESS": "local",
            "RAY_TMPDIR": os.path.join(tmp, way),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            marker[0]: marker[1],
        }
        for way in ("d", "s")
    )
    for env in envs:
        os.mkdir(env["RAY_TMPDIR"])
    try:
        yield envs[0], envs[1]
    finally:
        deadline = time.monotonic() + 15  # a grace period for processes on their way out
        while (left := _processes_with_env("=".join(marker))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left behind (killed): {left}"


def test_ray_tune_mlflow_logger_callback(
    ways: Ways, empty_store: Path, ray_envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    _needs("ray.tune", reason=f"Ray Tune is not installed: {EXTRA}")
    prepared(ways, empty_store)
    env_direct, env_spooled = ray_envs
    run_both(
        RAY_TUNE, ways.direct, ways.spooled, env_direct, env_spooled=env_spooled, timeout=TIMEOUT
    )
    ways.sync()

    def rename(name: str) -> str:
        return RAY_TRIAL_ID.sub(r"_<tune run>_\1", name)

    same = {"volatile": RAY_VOLATILE, "rename": rename, "drop_metrics": RAY_RANDOM_METRICS}
    direct = normalised(ways.direct_db, **same)
    synced = normalised(ways.synced_db, **same)
    assert sorted(k for k in direct if k != "experiments") == [
        "tune/train_fn_<tune run>_00000",
        "tune/train_fn_<tune run>_00001",
    ]
    for index, lr in enumerate((0.1, 0.2)):
        run = direct[f"tune/train_fn_<tune run>_{index:05d}"]
        assert run["status"] == "FINISHED"
        assert run["params"] == {"lr": str(lr), "width": "3"}
        assert run["tags"]["trial_name"] == f"train_fn_<tune run>_{index:05d}"
        assert set(RAY_VOLATILE) <= set(run["metrics"])
        assert run["metrics"]["score"] == sorted(
            [(s, sum(lr * i for i in range(1, s + 1))) for s in range(1, 5)], key=repr
        )
    assert_same(direct, synced)


# -- differences found through the integrations --------------------------------------------------

CLIENT_CREATE_RUN = """
from mlflow import MlflowClient

client = MlflowClient()
run = client.create_run(client.create_experiment("client"), run_name="plain")
client.set_terminated(run.info.run_id)
"""


def test_client_create_run_gets_no_context_tags(ways: Ways, empty_store: Path) -> None:
    """MlflowClient.create_run (Ray Tune's MLflowLoggerCallback) resolves no context tags:
    SQLite's run has only mlflow.runName; the synced run must not have more."""
    prepared(ways, empty_store)
    run_both(CLIENT_CREATE_RUN, ways.direct, ways.spooled)
    ways.sync()
    direct, synced = dump(ways.direct_db), dump(ways.synced_db)
    assert direct["client/plain"]["tags"] == {"mlflow.runName": "plain"}
    assert_same(direct, synced)


SEEDED = """
import random

import mlflow

random.seed(0)
with mlflow.start_run(run_name="named"):
    pass
print(random.random())
"""


def test_named_run_leaves_random_state_alone(ways: Ways, empty_store: Path) -> None:
    """A seeded script that starts a named run draws the same random numbers either way."""
    prepared(ways, empty_store)
    direct, spooled = run_both(SEEDED, ways.direct, ways.spooled)
    assert direct.stdout == spooled.stdout, (direct.stdout, spooled.stdout)
