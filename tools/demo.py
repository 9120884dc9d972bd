"""Demo pipeline: log a small coupon-build pipeline through the tracker, sync it, show the result.

Run with ``./tools/demo.sh`` (sets up .venv first) or ``.venv/bin/python tools/demo.py``.
Everything goes to the project's default locations from ``config/mlflow.yaml``: spools under
``data/runs``, artifacts under ``data/artifacts``, MLflow in ``data/mlflow/mlruns.db``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from formula_foundry.config import load_settings
from formula_foundry.substrate import ArtifactStore, DeterminismConfig, Manifest, init_run_dir
from formula_foundry.tracking import get_tracker

ROOT = Path(__file__).resolve().parents[1]


def build_coupon(out: Path, seed: int) -> Path:
    """Stand-in for a real coupon generator: writes a small deterministic board file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "coupon.kicad_pcb"
    lines = [f"(kicad_pcb (version 20240108) (generator formula-foundry-demo) (seed {seed})"]
    lines += [f"  (via (at {i * 0.5:.1f} 0) (size 0.6) (drill 0.3))" for i in range(200)]
    path.write_text("\n".join(lines) + ")\n", encoding="utf-8")
    return path


def run_pipeline() -> None:
    manifest = Manifest.from_environment(
        determinism=DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8")
    )
    run_id = time.strftime("demo-%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    run_artifacts = init_run_dir(run_root=Path("data/runs"), run_id=run_id)
    store = ArtifactStore(root=Path("data/artifacts"))
    tracker = get_tracker()

    with tracker.start_run(
        run_name="demo-pipeline", manifest=manifest, run_artifacts=run_artifacts
    ) as parent:
        parent.log_param("pipeline_version", "1.0")

        with tracker.start_run(run_name="coupongen", nested=True) as gen:
            started = time.perf_counter()
            gen.log_param("coupon_family", "F1_SINGLE_ENDED_VIA")
            gen.log_param("fab_profile", "oshpark_4layer")
            board = build_coupon(run_artifacts.run_dir / "outputs", seed=42)
            entry = store.add_file(board, logical_path="coupon.kicad_pcb")
            gen.log_artifact_reference(
                logical_path=entry.path, digest=entry.digest, size_bytes=entry.size_bytes
            )
            gen.log_metric("build_time_seconds", time.perf_counter() - started)
            gen.log_metric("constraint_violations", 0)
            gen.set_tag("status", "success")

        with tracker.start_run(
            run_name="simulation", nested=True, experiment_name="ff-m2-simulation"
        ) as sim:
            sim.log_param("solver", "demo-fdtd")
            for step in range(100):
                freq_ghz = 0.1 * (step + 1)
                sim.log_metrics(
                    {
                        "insertion_loss_db": -0.05 * freq_ghz - 0.01 * math.sin(step),
                        "return_loss_db": -30.0 + 0.8 * freq_ghz,
                    },
                    step=step,
                )
        parent.log_metric("pipeline_stage", 2)


def main() -> int:
    os.chdir(ROOT)
    settings = load_settings()
    print(f"1/3 logging the demo pipeline into spools under {settings.spool_root}")
    run_pipeline()
    # The MLflow drop-in: an unmodified MLflow script, pointed at the same spool.
    print("    and an unmodified MLflow script with MLFLOW_TRACKING_URI=spool:")
    trained = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo_mlflow_train.py")],
        env={**os.environ, "MLFLOW_TRACKING_URI": "spool:"},
        check=False,
    )
    if trained.returncode != 0:
        print(f"the MLflow script exited with {trained.returncode}", file=sys.stderr)
        return trained.returncode

    print(f"2/3 syncing spools into {settings.backend_store_uri} with ff-sync")
    done = subprocess.run([sys.executable, "-m", "formula_foundry.sync"], check=False)
    if done.returncode != 0:
        print(f"ff-sync exited with {done.returncode}", file=sys.stderr)
        return done.returncode

    print("3/3 what MLflow now holds")
    import mlflow

    mlflow.set_tracking_uri(settings.backend_store_uri)
    for name in ("formula-foundry", "ff-m2-simulation", "dropin-demo"):
        runs = mlflow.search_runs(experiment_names=[name], order_by=["start_time DESC"])
        cols = [c for c in ("tags.mlflow.runName", "status") if c in runs.columns]
        print(f"  experiment {name}: {len(runs)} runs")
        print(runs[cols].head(6).to_string(index=False))
    db = Path(settings.backend_store_uri.removeprefix("sqlite:///"))
    rel = os.path.relpath(db, ROOT) if db.is_absolute() else str(db)
    print("\nOpen the MLflow UI with:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{rel}")
    print("then browse http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
