#!/usr/bin/env python3
"""Check system metrics on a GPU machine: a short run, synced, and the GPU series it got.

Usage (on a GPU node, inside the job whose GPUs you want to see, e.g. ``srun --gpus=1``)::

    python tools/check_gpu_metrics.py [--seconds 6] [--keep DIR]

It needs ``pip install 'formula-foundry[system,tracking]'`` (psutil, nvidia-ml-py, MLflow).

1. says which GPUs belong to this job, and from which variable (``CUDA_VISIBLE_DEVICES``,
   Slurm's, or every GPU NVML sees outside a scheduler) — docs/observability.md;
2. runs a child process that starts a tracker run with system metrics every second for
   ``--seconds``, under this environment;
3. syncs its spool with ``ff-sync`` into a SQLite store in a temporary folder;
4. prints every ``system/gpu_*`` series MLflow holds (points, first, last, highest), or says
   plainly why there is none.

Exit status: 0 when MLflow holds GPU series for every GPU of the job, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

_CHILD = """
import sys, time
from formula_foundry.tracking import get_tracker
with get_tracker().start_run(run_id="gpu-check", run_name="gpu-check",
                             log_system_metrics=True) as run:
    run.log_param("check", "tools/check_gpu_metrics.py")
    time.sleep(float(sys.argv[1]))
"""


def describe_gpus() -> int:
    """Print the job's GPUs as the sampler will choose them; return how many."""
    from formula_foundry.tracking.gpus import NvmlError, load_nvml, requested_gpus, select_gpus

    request = requested_gpus(os.environ)
    print(f"GPUs of this job, from: {request.describe()}")
    if request.entries == ():
        print(f"  none ({request.source or 'the environment names none'})")
        return 0
    try:
        nvml = load_nvml()
    except ImportError:
        print("  cannot tell: nvidia-ml-py is not installed ('formula-foundry[system]')")
        return 0
    except NvmlError as exc:
        print(f"  cannot tell: NVML does not start ({exc}); is the NVIDIA driver loaded?")
        return 0
    try:
        handles = select_gpus(nvml, request)
        print(f"  NVML sees {nvml.device_count()} GPU(s) on this host")
        for i, handle in enumerate(handles):
            print(f"  gpu_{i}: {nvml.uuid(handle)}")
    except NvmlError as exc:
        print(f"  cannot tell: NVML failed ({exc})")
        return 0
    finally:
        nvml.shutdown()
    if not handles:
        print("  none of them is this job's")
    return len(handles)


def run_and_sync(folder: Path, seconds: float) -> Path:
    """Run the child, sync its spool into ``folder/mlruns.db``; return the database."""
    spool, db = folder / "runs", folder / "mlruns.db"
    env = dict(os.environ)
    for name in ("FF_CONFIG", "FF_TRACKING_DISABLED", "FF_RUN_ID", "FF_SYSTEM_METRICS"):
        env.pop(name, None)
    env.update(FF_SPOOL_ROOT=str(spool), FF_SYSTEM_METRICS_INTERVAL_S="1")
    print(f"\nlogging a run with system metrics every 1 s for {seconds:g} s (spool: {spool})")
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(seconds)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if child.stderr.strip():
        print(textwrap.indent(child.stderr.strip(), "  child: "))
    if child.returncode != 0:
        raise SystemExit(f"the run failed (exit {child.returncode})")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    print(f"syncing into {db}")
    sync = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if sync.returncode != 0:
        raise SystemExit(f"ff-sync failed (exit {sync.returncode}):\n{sync.stdout}{sync.stderr}")
    return db


def gpu_series(db: Path) -> dict[str, list[Any]]:
    """``system/...gpu_*`` key -> its points (MLflow's Metric objects), from the store."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise SystemExit(
            "MLflow is not installed here: pip install 'formula-foundry[tracking]'"
        ) from None
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("formula-foundry")
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    if not runs:
        raise SystemExit("the run is not in the store after the sync")
    run = runs[0]
    keys = sorted(k for k in run.data.metrics if k.startswith("system/"))
    print(f"MLflow run {run.info.run_id}: {len(keys)} system series")
    return {
        k: client.get_metric_history(run.info.run_id, k)
        for k in keys
        if k.rsplit("/", 1)[-1].startswith("gpu_")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the run lasts")
    parser.add_argument("--keep", type=Path, default=None, help="keep spool and store here")
    args = parser.parse_args()

    expected = describe_gpus()
    with tempfile.TemporaryDirectory(prefix="ff-gpu-check-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        series = gpu_series(run_and_sync(folder, args.seconds))
    if not series:
        print(
            "\nNO GPU SERIES: the run recorded no GPU metric. See the GPUs of this job above "
            "and any warning of the child; docs/observability.md explains the selection."
        )
        return 1
    print(f"\n{'series':<48} {'points':>6} {'first':>10} {'last':>10} {'highest':>10}")
    for key, points in series.items():
        values = [p.value for p in sorted(points, key=lambda p: p.step)]
        print(
            f"{key:<48} {len(values):>6} {values[0]:>10.1f} {values[-1]:>10.1f} "
            f"{max(values):>10.1f}"
        )
    found = {k.rsplit("/", 1)[-1].split("_")[1] for k in series}
    if len(found) < expected:
        print(f"\nonly {len(found)} of the job's {expected} GPUs have series")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
