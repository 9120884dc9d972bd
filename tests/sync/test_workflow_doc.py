"""The workflow document ("Experiment Tracking Workflow"), end to end: its tracker snippets run
in a project configured with its ``config/mlflow.yaml``, then ``ff-sync``, then its
"Programmatic Access" snippet finds the runs, params, metrics, tags, experiments, nesting and
artifact references it describes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import FF_SYNC

DOC_CONFIG = """\
tracking:
  # SQLite backend for experiment metadata
  backend_store_uri: "sqlite:///data/mlflow/mlruns.db"

  # Local artifact storage root
  artifact_root: "data/mlflow/artifacts"

  # Default experiment name
  default_experiment: "formula-foundry"
"""

# The document's snippets, in order; only the prints at the end are ours.
DOC_SNIPPETS = """
from pathlib import Path
from formula_foundry.tracking import get_tracker

tracker = get_tracker()

with tracker.start_run(run_name="my-coupon-build") as run:
    # Log parameters
    run.log_param("coupon_family", "F1_SINGLE_ENDED_VIA")
    run.log_param("fab_profile", "oshpark_4layer")

    # Log metrics
    run.log_metric("build_time_seconds", 12.5)
    run.log_metric("constraint_violations", 0)

    # Set tags
    run.set_tag("status", "success")

from formula_foundry.substrate import Manifest, DeterminismConfig
from formula_foundry.tracking import get_tracker

# Create manifest from environment
manifest = Manifest.from_environment(
    determinism=DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8")
)

tracker = get_tracker()

with tracker.start_run(run_name="tracked-build", manifest=manifest) as run:
    run.log_metric("some_metric", 42.0)

from formula_foundry.substrate import init_run_dir, create_run, Manifest
from formula_foundry.tracking import get_tracker

# Create substrate run directory
run_artifacts = init_run_dir(run_root=Path("data/runs"), run_id="run-001")

tracker = get_tracker()

with tracker.start_run(
    run_name="linked-run",
    run_artifacts=run_artifacts,
) as run:
    run.log_metric("pipeline_stage", 1)

from formula_foundry.substrate import ArtifactStore
from formula_foundry.tracking import get_tracker

store = ArtifactStore(root=Path("data/artifacts"))

# Add file to substrate store
entry = store.add_file(Path("output/coupon.kicad_pcb"), logical_path="coupon.kicad_pcb")

tracker = get_tracker()

with tracker.start_run(run_name="artifact-run") as run:
    # Log reference (creates a small JSON file, not the full artifact)
    run.log_artifact_reference(
        logical_path=entry.path,
        digest=entry.digest,
        size_bytes=entry.size_bytes,
    )

tracker = get_tracker()

with tracker.start_run(
    run_name="sim-001",
    experiment_name="ff-m2-simulation",
) as run:
    run.log_metric("insertion_loss_db", -0.5)

tracker = get_tracker()

with tracker.start_run(run_name="pipeline-run") as parent:
    parent.log_param("pipeline_version", "1.0")

    with tracker.start_run(run_name="coupongen", nested=True) as child1:
        child1.log_metric("build_time", 5.0)

    with tracker.start_run(run_name="simulation", nested=True) as child2:
        child2.log_metric("sim_time", 120.0)

print(manifest.to_tags()["git_sha"])
"""

PROGRAMMATIC_ACCESS = """
import json
import mlflow

mlflow.set_tracking_uri("sqlite:///data/mlflow/mlruns.db")

# List experiments
experiments = mlflow.search_experiments()

# Search runs
runs = mlflow.search_runs(experiment_names=["formula-foundry"])

# Get specific run
run = mlflow.get_run(run_id=runs.iloc[0]["run_id"])

out = {
    "experiments": sorted(e.name for e in experiments),
    "runs": {},
    "first": run.info.run_name,
}
for run_id in runs["run_id"]:
    r = mlflow.get_run(run_id)
    refs = mlflow.MlflowClient().list_artifacts(run_id, "ff_artifact_refs")
    out["runs"][r.info.run_name] = {
        "id": run_id,
        "status": r.info.status,
        "params": r.data.params,
        "metrics": r.data.metrics,
        "tags": r.data.tags,
        "refs": [
            mlflow.artifacts.load_dict(f"{r.info.artifact_uri}/{a.path}") for a in refs
        ],
    }
sim = mlflow.search_runs(experiment_names=["ff-m2-simulation"])
names, losses = sim["tags.mlflow.runName"], sim["metrics.insertion_loss_db"]
out["sim"] = dict(zip(names, losses))
print(json.dumps(out))
"""


def _python(root: Path, code: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_workflow_document_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "config").mkdir(parents=True)
    (root / "config" / "mlflow.yaml").write_text(DOC_CONFIG)
    (root / "docs").mkdir()
    (root / "docs" / "design.md").write_text("# Design\n")
    (root / "output").mkdir()
    board = b"(kicad_pcb (version 20240108))\n"
    (root / "output" / "coupon.kicad_pcb").write_bytes(board)

    git_sha = _python(root, DOC_SNIPPETS).strip()
    sync = subprocess.run(
        [FF_SYNC],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.startswith("ff-sync: synced: 8 runs, ")
    assert sync.stdout.rstrip().endswith(f"-> sqlite:///{root / 'data/mlflow/mlruns.db'}")

    out = json.loads(_python(root, PROGRAMMATIC_ACCESS))
    assert {"formula-foundry", "ff-m2-simulation"} <= set(out["experiments"])
    runs = out["runs"]
    assert set(runs) == {
        "my-coupon-build",
        "tracked-build",
        "linked-run",
        "artifact-run",
        "pipeline-run",
        "coupongen",
        "simulation",
    }
    assert all(r["status"] == "FINISHED" for r in runs.values())
    build = runs["my-coupon-build"]
    assert build["params"] == {
        "coupon_family": "F1_SINGLE_ENDED_VIA",
        "fab_profile": "oshpark_4layer",
    }
    assert build["metrics"] == {"build_time_seconds": 12.5, "constraint_violations": 0.0}
    assert build["tags"]["status"] == "success"
    tracked = runs["tracked-build"]["tags"]
    assert tracked["git_sha"] == git_sha and tracked["determinism_mode"] == "strict"
    assert {"design_doc_sha256", "environment_fingerprint", "seed_python"} <= set(tracked)
    linked = runs["linked-run"]["tags"]
    assert linked["substrate_run_id"] == "run-001"
    assert linked["substrate_run_dir"] == str(root / "data" / "runs" / "run-001")
    (ref,) = runs["artifact-run"]["refs"]
    assert ref["logical_path"] == "coupon.kicad_pcb" and ref["size_bytes"] == len(board)
    assert ref["digest"] == "sha256:" + hashlib.sha256(board).hexdigest()
    assert ref["store_root"] == str(root / "data" / "artifacts")
    assert not list((root / "data" / "mlflow" / "artifacts").rglob("coupon.kicad_pcb"))
    parent_id = runs["pipeline-run"]["id"]
    assert runs["pipeline-run"]["params"] == {"pipeline_version": "1.0"}
    for child, metric in (("coupongen", "build_time"), ("simulation", "sim_time")):
        assert runs[child]["tags"]["mlflow.parentRunId"] == parent_id
        assert metric in runs[child]["metrics"]
    assert out["sim"] == {"sim-001": -0.5}
    # The spool root and the substrate run folder share data/runs; the sync reads only spools.
    assert (root / "data" / "runs" / "run-001").is_dir()
