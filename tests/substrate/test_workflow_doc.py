"""The substrate side of the workflow document's snippets ("Experiment Tracking Workflow"),
copied verbatim; the tracker lines are left out. The document uses ``Path`` without importing
it, so the namespace provides it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from formula_foundry.substrate import ArtifactEntry, Manifest, RunArtifacts

MANIFEST_SNIPPET = """
from formula_foundry.substrate import Manifest, DeterminismConfig

# Create manifest from environment
manifest = Manifest.from_environment(
    determinism=DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8")
)
"""

RUN_DIR_SNIPPET = """
from formula_foundry.substrate import init_run_dir, create_run, Manifest

# Create substrate run directory
run_artifacts = init_run_dir(run_root=Path("data/runs"), run_id="run-001")
"""

STORE_SNIPPET = """
from formula_foundry.substrate import ArtifactStore

store = ArtifactStore(root=Path("data/artifacts"))

# Add file to substrate store
entry = store.add_file(Path("output/coupon.kicad_pcb"), logical_path="coupon.kicad_pcb")
"""


def _run(snippet: str) -> dict[str, object]:
    namespace: dict[str, object] = {"Path": Path}
    exec(compile(snippet, "<workflow doc>", "exec"), namespace)
    return namespace


def test_manifest_snippet(project: Path) -> None:
    manifest = _run(MANIFEST_SNIPPET)["manifest"]
    assert isinstance(manifest, Manifest)
    tags = manifest.to_tags()
    assert tags["determinism_mode"] == "strict"
    assert {"git_sha", "design_doc_sha256", "environment_fingerprint"} <= set(tags)
    assert {k for k in tags if k.startswith("seed_")} == {"seed_python", "seed_numpy", "seed_torch"}


def test_run_dir_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_artifacts = _run(RUN_DIR_SNIPPET)["run_artifacts"]
    assert isinstance(run_artifacts, RunArtifacts)
    assert run_artifacts.run_id == "run-001"
    assert run_artifacts.run_dir == (tmp_path / "data" / "runs" / "run-001").resolve()
    run_artifacts.link_tracking_run("0123abcd", "formula-foundry", "linked-run")
    assert run_artifacts.tracking_runs()[0]["run_name"] == "linked-run"


def test_artifact_store_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    board = b"(kicad_pcb (version 20240108))\n"
    (tmp_path / "output" / "coupon.kicad_pcb").write_bytes(board)
    entry = _run(STORE_SNIPPET)["entry"]
    assert isinstance(entry, ArtifactEntry)
    # The three values the document passes to run.log_artifact_reference:
    assert entry.path == "coupon.kicad_pcb"
    assert entry.digest == "sha256:" + hashlib.sha256(board).hexdigest()
    assert entry.size_bytes == len(board)
