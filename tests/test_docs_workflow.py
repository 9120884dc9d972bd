"""docs/workflow.md, the user's "Experiment Tracking Workflow", stays verbatim and runs.

The page is one header line, then the user's text unchanged; its blocks are read from the page,
not copied here. Its tracker and substrate blocks run in document order in one fresh interpreter
(they build on each other: the later ones use ``get_tracker`` imported by the first) in a project
configured with the page's own ``config/mlflow.yaml``; then ``ff-sync``; then its "Programmatic
Access" block finds the runs, params, metrics, tags, experiments, nesting and artifact references
the page describes. Two liberties, both checked: the page uses ``Path`` without importing it, so
the blocks' namespace provides it, and its placeholder ``run_id="abc123"`` becomes the id of a
run the search found. Only the code after each group of blocks (printing what to assert) is ours.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "workflow.md"
# The user's text as received; outside the repository, so the digest below pins it wherever
# the seed file is absent.
SEED = Path("/work/shared/seeds/000_c50f817b4b0ff1a6.txt")
SEED_SHA256 = "a99fc84b6cb783fd6adb7fdc3e90dbb171c5d002edd4260e765d2490d47750ce"
FF_SYNC = str(Path(sys.executable).with_name("ff-sync"))
PLACEHOLDER = 'run_id="abc123"'
RUN_NAMES = {
    "my-coupon-build",
    "tracked-build",
    "linked-run",
    "artifact-run",
    "pipeline-run",
    "coupongen",
    "simulation",
}

# Runs the blocks listed in the JSON file argv[1] in one namespace, as a reader pasting them
# one after the other into one session would; a traceback names the block.
RUNNER = """
import json, sys
from pathlib import Path

namespace = {"__name__": "__main__", "Path": Path}
for where, code in json.loads(Path(sys.argv[1]).read_text()):
    exec(compile(code, where, "exec"), namespace)
"""

# Ours, after the tracker and substrate blocks: what they left in their variables.
AFTER_TRACKER_BLOCKS = """
import json
from formula_foundry.substrate import ArtifactEntry, Manifest, RunArtifacts

print(json.dumps({
    "manifest_is_a_manifest": isinstance(manifest, Manifest),
    "manifest_tags": manifest.to_tags(),
    "run_artifacts_are_run_artifacts": isinstance(run_artifacts, RunArtifacts),
    "run_artifacts": [run_artifacts.run_id, str(run_artifacts.run_dir)],
    "tracking_runs": run_artifacts.tracking_runs(),
    "entry_is_an_entry": isinstance(entry, ArtifactEntry),
    "entry": [entry.path, entry.digest, entry.size_bytes],
}))
"""

# Ours, after "Programmatic Access": what MLflow holds, read through the block's variables.
AFTER_PROGRAMMATIC_ACCESS = """
import json
import mlflow

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


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def body() -> str:
    """The page without its header line: the user's text."""
    header, sep, rest = DOC.read_text(encoding="utf-8").partition("\n\n")
    assert sep and header.startswith("> ") and "\n" not in header, "one header line, then text"
    return rest


def test_the_page_is_the_users_text_verbatim() -> None:
    text = body()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SEED_SHA256, (
        "docs/workflow.md must stay the user's text verbatim (after its header line)"
    )
    assert len(fenced(text, "python")) == 7
    if SEED.is_file():
        seed = SEED.read_text(encoding="utf-8")
        assert fenced(text, "python") == fenced(seed, "python")
        assert text == seed


def _python(root: Path, blocks: list[tuple[str, str]]) -> str:
    listing = root.parent / "blocks.json"
    listing.write_text(json.dumps(blocks), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(listing)],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _blocks() -> tuple[list[tuple[str, str]], tuple[str, str], str]:
    """The tracker and substrate blocks, the Programmatic Access block, the YAML config."""
    text = body()
    code = [
        (f"docs/workflow.md python block {i}", block)
        for i, block in enumerate(fenced(text, "python"), start=1)
    ]
    *tracker_blocks, access = code
    assert "mlflow.set_tracking_uri" in access[1]
    assert all("import mlflow" not in block for _, block in tracker_blocks)
    assert access[1].count(PLACEHOLDER) == 1
    (config,) = fenced(text, "yaml")
    return tracker_blocks, access, config


def test_the_workflow_page_end_to_end(tmp_path: Path) -> None:
    tracker_blocks, (where, access), config = _blocks()
    root = tmp_path / "project"
    (root / "config").mkdir(parents=True)
    (root / "config" / "mlflow.yaml").write_text(config)
    (root / "docs").mkdir()
    design = b"# Design\n\nCoupons are built from formulas.\n"
    (root / "docs" / "design.md").write_bytes(design)
    (root / "output").mkdir()
    board = b"(kicad_pcb (version 20240108))\n"
    (root / "output" / "coupon.kicad_pcb").write_bytes(board)

    facts = json.loads(_python(root, [*tracker_blocks, ("ours", AFTER_TRACKER_BLOCKS)]))
    _check_substrate_facts(root, facts, design, board)

    sync = subprocess.run(
        [FF_SYNC],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.startswith("ff-sync: synced: 8 runs, ")
    assert sync.stdout.rstrip().endswith(f"-> sqlite:///{root / 'data/mlflow/mlruns.db'}")

    access = access.replace(PLACEHOLDER, 'run_id=runs.iloc[0]["run_id"]')
    out = json.loads(_python(root, [(where, access), ("ours", AFTER_PROGRAMMATIC_ACCESS)]))
    _check_mlflow(root, out, facts, board)


def _check_substrate_facts(root: Path, facts: dict[str, Any], design: bytes, board: bytes) -> None:
    assert facts["manifest_is_a_manifest"]
    tags = facts["manifest_tags"]
    assert tags["determinism_mode"] == "strict"
    assert {"git_sha", "design_doc_sha256", "environment_fingerprint"} <= set(tags)
    assert tags["design_doc_sha256"] == hashlib.sha256(design).hexdigest()
    assert {k for k in tags if k.startswith("seed_")} == {"seed_python", "seed_numpy", "seed_torch"}
    assert facts["run_artifacts_are_run_artifacts"]
    run_dir = (root / "data" / "runs" / "run-001").resolve()
    assert facts["run_artifacts"] == ["run-001", str(run_dir)]
    (linked,) = facts["tracking_runs"]  # start_run(run_artifacts=...) linked the run
    assert linked["run_name"] == "linked-run" and linked["experiment"] == "formula-foundry"
    assert facts["entry_is_an_entry"]
    # The three values the page passes to run.log_artifact_reference:
    assert facts["entry"] == [
        "coupon.kicad_pcb",
        "sha256:" + hashlib.sha256(board).hexdigest(),
        len(board),
    ]


def _check_mlflow(root: Path, out: dict[str, Any], facts: dict[str, Any], board: bytes) -> None:
    assert {"formula-foundry", "ff-m2-simulation"} <= set(out["experiments"])
    runs = out["runs"]
    assert set(runs) == RUN_NAMES and out["first"] in RUN_NAMES
    assert all(r["status"] == "FINISHED" for r in runs.values())
    build = runs["my-coupon-build"]
    assert build["params"] == {
        "coupon_family": "F1_SINGLE_ENDED_VIA",
        "fab_profile": "oshpark_4layer",
    }
    assert build["metrics"] == {"build_time_seconds": 12.5, "constraint_violations": 0.0}
    assert build["tags"]["status"] == "success"
    tracked = runs["tracked-build"]["tags"]
    assert {k: tracked[k] for k in facts["manifest_tags"]} == facts["manifest_tags"]
    assert tracked["determinism_mode"] == "strict"
    assert {"design_doc_sha256", "environment_fingerprint", "seed_python"} <= set(tracked)
    linked = runs["linked-run"]["tags"]
    assert linked["substrate_run_id"] == "run-001"
    assert linked["substrate_run_dir"] == str(root / "data" / "runs" / "run-001")
    assert linked["ff.run_uuid"] == facts["tracking_runs"][0]["run_uuid"]
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
