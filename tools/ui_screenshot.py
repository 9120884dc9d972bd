#!/usr/bin/env python3
"""Screenshots of the MLflow UI showing a demo run logged offline and synced by ``ff-sync``.

The demo trains a small scikit-learn model with ``mlflow.sklearn.autolog()`` and logs a
matplotlib figure, unmodified MLflow code against ``MLFLOW_TRACKING_URI=spool:...``; then
``ff-sync`` replays the spool into a fresh SQLite store, an ``mlflow server`` serves it on
127.0.0.1, and headless Chromium (Debian's ``chromium``) renders the run's artifacts (the plot)
and the logged model. The PNGs go to ``docs/img/`` for ``docs/mlflow-dropin.md``.

Usage: ``.venv/bin/python tools/ui_screenshot.py [--out docs/img] [--keep DIR]``
(needs ``apt-get install chromium``; nothing here runs in the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

DEMO = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

mlflow.set_experiment("offline-demo")
mlflow.sklearn.autolog()
X, y = load_diabetes(return_X_y=True)
with mlflow.start_run(run_name="ridge-on-a-compute-node") as run:
    model = Ridge(alpha=0.5).fit(X, y)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(y, model.predict(X), s=8)
    ax.set_xlabel("target")
    ax.set_ylabel("prediction")
    ax.set_title("Ridge, logged offline, synced later")
    mlflow.log_figure(fig, "plots/predictions.png")
    for step, loss in enumerate([1.0, 0.6, 0.45, 0.4, 0.38]):
        mlflow.log_metric("train_loss", loss, step=step)
    print(run.info.run_id)
"""

CONFIG = """\
tracking:
  backend_store_uri: "sqlite:///{db}"
  artifact_root: "{artifacts}"
spool:
  root: "data/runs"
artifacts:
  store_root: "data/artifacts"
sync:
  state_dir: "data/sync"
"""

SERVE = ["--host", "127.0.0.1", "--workers", "1", "--port"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,900",
    "--virtual-time-budget=20000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return dict(json.load(resp))


def _wait_for(url: str, server: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not answer {url} within {timeout_s:.0f} s")


def _shoot(chromium: str, url: str, out: Path, profile: Path) -> None:
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{out} <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    work = args.keep or Path(tempfile.mkdtemp(prefix="ff-ui-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config").mkdir(exist_ok=True)
    db, artifacts = work / "mlflow.db", work / "mlflow-artifacts"
    (work / "config" / "mlflow.yaml").write_text(CONFIG.format(db=db, artifacts=artifacts))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"spool://{work / 'data' / 'runs'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    (work / "train.py").write_text(textwrap.dedent(DEMO))
    demo = subprocess.run(
        [sys.executable, "train.py"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    spool_run_id = demo.stdout.split()[-1]
    sync = subprocess.run(
        [str(BIN / "ff-sync"), "--config", str(work / "config" / "mlflow.yaml")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    print(sync.stdout, sync.stderr, sep="")
    if sync.returncode != 0:
        raise SystemExit(f"ff-sync exited with {sync.returncode}")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            *SERVE,
            str(port),
        ],
        cwd=work,
        env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(f"{base}/health", server)
        found = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=offline-demo")
        experiment_id = str(dict(found["experiment"])["experiment_id"])  # type: ignore[call-overload]
        query = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps(
                {
                    "experiment_ids": [experiment_id],
                    "filter": f"tags.`ff.run_uuid` = '{spool_run_id}'",
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(query, timeout=10) as resp:
            (run,) = json.load(resp)["runs"]
        run_id = run["info"]["run_id"]
        args.out.mkdir(parents=True, exist_ok=True)
        profile = work / "chromium-profile"
        page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        _shoot(
            chromium,
            f"{page}/artifacts/plots/predictions.png",
            args.out / "ui-run-plot.png",
            profile,
        )
        models = run.get("outputs", {}).get("model_outputs", [])
        if models:
            model_id = models[0]["model_id"]
            _shoot(
                chromium,
                f"{base}/#/experiments/{experiment_id}/models/{model_id}",
                args.out / "ui-logged-model.png",
                profile,
            )
        else:
            print("the run has no logged model output: no model screenshot", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
