"""Files logged to a run (``Run.log_artifact``) reach the destination run's artifacts whole,
once, through MLflow's own client: a local artifact root, PostgreSQL's, and an ``mlflow
server`` proxying its artifacts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from formula_foundry.substrate.artifact_store import stored_object_path
from tests.sync.conftest import Destination, Project

LOG = """
import sys
from pathlib import Path
src = Path(sys.argv[1])
with tracker.start_run(run_name="files") as run:
    run.log_artifact(src / "config.yaml")
    run.log_artifact(src / "plots", "figures")
    run.log_artifact(src / "config.yaml", "copies/again")
    (src / "config.yaml").write_text("lr: 0.2\\n")  # logged again below: the later bytes win
    run.log_artifact(src / "config.yaml")
    run.log_metric("loss", 0.5)
    print(run.run_id)
"""


def _sources(root: Path) -> Path:
    src = root / "src"
    (src / "plots" / "sub").mkdir(parents=True)
    (src / "config.yaml").write_text("lr: 0.1\n")
    (src / "plots" / "a.png").write_bytes(bytes(range(256)) * 40)
    (src / "plots" / "sub" / "b.txt").write_text("b" * 10_000)
    (src / "plots" / "empty").write_bytes(b"")
    return src


def _tree(project: Project, run_id: str) -> dict[str, bytes]:
    """Every artifact file of the destination run (reference documents aside), downloaded."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (found,) = client.search_runs(experiments, filter_string=f"tags.`ff.run_uuid` = '{run_id}'")
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(found.info.run_id, "", tmp))
        for path in sorted(local.rglob("*")):
            if path.is_file():
                out[path.relative_to(local).as_posix()] = path.read_bytes()
    return out


def test_logged_files_are_uploaded_once(project: Project, destination: Destination) -> None:
    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    first = project.sync()
    assert first.exit_code == 0, first
    assert first.files == 5  # six events: config.yaml twice at one path, in one upload batch
    expected = {
        "config.yaml": b"lr: 0.2\n",
        "figures/plots/a.png": bytes(range(256)) * 40,
        "figures/plots/sub/b.txt": b"b" * 10_000,
        "figures/plots/empty": b"",
        "copies/again/config.yaml": b"lr: 0.1\n",
    }
    assert _tree(project, run_id) == expected
    again = project.sync()
    assert again.files == 0 and again.exit_code == 0  # nothing is sent twice
    replay = project.sync(replay=True)
    assert replay.exit_code == 0
    assert _tree(project, run_id) == expected  # a full resend writes the same tree


def test_a_missing_object_waits_and_nothing_after_it_is_lost(project: Project) -> None:
    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    store = project.root / "data" / "artifacts"
    digest = "sha256:" + __import__("hashlib").sha256(b"b" * 10_000).hexdigest()
    obj = stored_object_path(store, digest)
    hidden = obj.with_name(obj.name + ".away")
    os.rename(obj, hidden)
    waiting = project.sync()
    assert waiting.exit_code == 1
    assert any("b.txt" in u and "not readable in store" in u for u in waiting.unreadable)
    assert project.snapshot()["runs"][run_id]["metrics"] == {}  # stopped before the metric
    os.rename(hidden, obj)
    done = project.sync()
    assert done.exit_code == 0 and not done.unreadable
    assert _tree(project, run_id)["figures/plots/sub/b.txt"] == b"b" * 10_000
    assert project.snapshot()["runs"][run_id]["metrics"]


def test_a_truncated_object_is_not_uploaded(project: Project) -> None:
    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    digest = "sha256:" + __import__("hashlib").sha256(bytes(range(256)) * 40).hexdigest()
    obj = stored_object_path(project.root / "data" / "artifacts", digest)
    os.chmod(obj, 0o644)
    with obj.open("r+b") as f:
        f.truncate(100)
    report = project.sync()
    assert report.exit_code == 1
    assert any("a.png" in u and "100 bytes" in u for u in report.unreadable), report.unreadable
    assert "figures/plots/a.png" not in _tree(project, run_id)


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_logging_what_is_not_there_names_it(project: Project, where: str) -> None:
    out = project.python(
        """
        from formula_foundry.errors import ValidationError
        from formula_foundry.tracking import get_tracker
        import sys
        with get_tracker().start_run() as run:
            try:
                run.log_artifact(sys.argv[1], sys.argv[2] or None)
            except ValidationError as exc:
                print(exc)
        """,
        "nope.txt" if where == "missing" else ".",
        "" if where == "missing" else "../up",
    ).stdout
    assert ("nope.txt" in out and "no such file" in out) or "'../up'" in out, out


def test_verify_checks_each_uploaded_file(project: Project) -> None:
    import json

    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    assert project.sync().exit_code == 0
    clean = project.ff_sync("verify", "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # Damage one uploaded file behind MLflow's back: verify names it, with both digests.
    (artifacts,) = (project.root / "data" / "mlflow" / "artifacts").glob(
        "*/*/artifacts/figures/plots/sub/b.txt"
    )
    artifacts.write_text("c" * 10_000)
    damaged = project.ff_sync("verify", "--json")
    assert damaged.returncode != 0
    assert damaged.stdout, damaged.stderr
    diffs = json.loads(damaged.stdout)["differences"]
    assert [(d["run"], d["kind"], d["key"]) for d in diffs] == [
        (run_id, "artifact_mismatch", "figures/plots/sub/b.txt")
    ], diffs
    artifacts.unlink()
    gone = json.loads(project.ff_sync("verify", "--json").stdout)["differences"]
    assert [d["kind"] for d in gone] == ["missing_artifact"]


def test_status_shows_the_bytes_still_to_upload(project: Project) -> None:
    import json

    src = _sources(project.root)
    project.spool(LOG, str(src))
    pending = json.loads(project.ff_sync("status", "--json").stdout)
    logged = 2 * 8 + 10240 + 10_000 + 0 + 8  # config.yaml three times, a.png, b.txt, empty
    (dest,) = pending["destinations"]
    assert dest["totals"]["bytes_pending_upload"] == logged
    assert dest["runs"][0]["bytes_pending_upload"] == logged
    table = project.ff_sync("status").stdout
    assert "KiB of files to upload" in table, table
    assert project.sync().exit_code == 0
    done = json.loads(project.ff_sync("status", "--json").stdout)["destinations"][0]
    assert done["totals"]["bytes_pending_upload"] == 0


def test_files_above_the_upload_limit_are_referenced(project: Project) -> None:
    import json

    text = project.config.read_text()
    project.config.write_text(text.replace("sync:\n", "sync:\n  upload_max_bytes: 9000\n", 1))
    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    report = project.sync()
    assert report.exit_code == 0 and report.files == 3  # config.yaml x2 paths, empty
    tree = _tree(project, run_id)
    assert "figures/plots/a.png" not in tree and "figures/plots/sub/b.txt" not in tree
    doc = json.loads(tree["ff_artifact_refs/figures/plots/a.png.json"])
    assert (doc["logical_path"], doc["size_bytes"]) == ("figures/plots/a.png", 10240)
    assert doc["store_root"] == str(project.root / "data" / "artifacts")
    verified = project.ff_sync("verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr


RESERVED = """
import sys
from pathlib import Path
src = Path(sys.argv[1])
with tracker.start_run(run_name="reserved") as run:
    run.log_artifact(src / ".artifact.uploading.keep")
    run.log_artifact(src / "config.yaml", "out")
    print(run.run_id)
"""


def test_a_name_mlflow_reserves_is_refused_not_swept_away(project: Project) -> None:
    """A local artifact root: a file named like MLflow's temporary files would be deleted by
    the next upload's sweep of killed uploads, so it is refused by name (MLflow refuses it
    too), and the files beside it arrive."""
    src = _sources(project.root)
    (src / ".artifact.uploading.keep").write_text("mine")
    run_id = project.spool(RESERVED, str(src)).strip()
    report = project.sync()
    assert report.exit_code == 1 and report.quarantined == 1, report
    lines = report.quarantine_file.read_text()
    assert ".artifact.uploading.keep" in lines and "reserved" in lines, lines
    assert _tree(project, run_id) == {"out/config.yaml": b"lr: 0.1\n"}


AGAIN = """
import sys
from pathlib import Path
with tracker.start_run(run_id=sys.argv[2] or None) as run:
    run.log_artifact(Path(sys.argv[1]) / "config.yaml", "out")
    print(run.run_id)
"""


def test_a_symlink_planted_in_the_artifact_root_is_not_followed_out(project: Project) -> None:
    src = _sources(project.root)
    run_id = project.spool(AGAIN, str(src), "").strip()
    assert project.sync().exit_code == 0
    (uploaded,) = (project.root / "data" / "mlflow" / "artifacts").rglob("out")
    outside = project.root / "outside"
    outside.mkdir()
    # The run's folder "out" now leads outside the root: the file logged there again (the run
    # resumed) must not be written through the link.
    shutil.rmtree(uploaded)
    uploaded.symlink_to(outside)
    assert project.spool(AGAIN, str(src), run_id).strip() == run_id
    report = project.sync()
    assert report.exit_code == 1, report
    assert "leads out of the run's artifact root" in report.quarantine_file.read_text()
    assert list(outside.iterdir()) == []


def test_the_direct_path_sweeps_mlflows_own_temporary_files() -> None:
    """The direct SQL path uploads into a local root without importing MLflow: its prefix of
    temporary files (swept after a killed upload, refused as a name) must be MLflow's."""
    from mlflow.store.artifact import local_artifact_repo

    from formula_foundry.sync.mlflow.local_upload import MLFLOW_TEMP_PREFIX

    assert MLFLOW_TEMP_PREFIX == local_artifact_repo._TEMP_ARTIFACT_PREFIX


def test_an_uploaded_file_keeps_its_objects_times_and_mode_as_mlflows_copy_does(
    project: Project,
) -> None:
    # MLflow's local upload copies a file with its times and mode (shutil.copy2); so does ours,
    # from the stored object, and never leaves a temporary file behind.
    src = _sources(project.root)
    run_id = project.spool(LOG, str(src)).strip()
    assert project.sync().exit_code == 0
    assert _tree(project, run_id)["figures/plots/a.png"] == bytes(range(256)) * 40
    store = project.root / "data" / "artifacts"
    objects = {p.read_bytes(): p for p in (store / "objects").rglob("*") if p.is_file()}
    (folder,) = (project.root / "data" / "mlflow" / "artifacts").glob("*/*/artifacts")
    uploaded = [p for p in folder.rglob("*") if p.is_file()]
    assert len(uploaded) == 5
    for path in uploaded:
        st, obj = path.stat(), objects[path.read_bytes()].stat()
        assert (st.st_mtime_ns, st.st_mode) == (obj.st_mtime_ns, obj.st_mode), path
        assert not path.name.startswith(".artifact.uploading.")


ACROSS = """
import sys
from pathlib import Path
src = Path(sys.argv[1])
with tracker.start_run(run_id=sys.argv[2] or None, run_name="across") as run:
    for name in sys.argv[3].split(","):
        run.log_artifact(src / name / "a.bin")
    if not sys.argv[2]:
        run.log_artifact(src / "small" / "a.bin", "b")  # b/a.bin: a file and a reference
        run.log_artifact_reference("b/a.bin", "sha256:" + "ef" * 32, 77)
        run.log_artifact(src / "big" / "a.bin", "d")  # d/a.bin referenced, a folder beside:
        run.log_artifact(src / "small" / "a.bin", "d/a.bin")  # d/a.bin/a.bin uploaded
    print(run.run_id)
"""


def test_the_last_file_at_a_path_wins_across_the_upload_limit(project: Project) -> None:
    """sync.upload_max_bytes sends a small file and references a big one; a path logged on
    both sides holds what was logged last — in one batch or across passes — not an older
    file beside the reference, nor a reference beside a newer file. A reference the program
    logged itself, and a folder at a referenced path, stay."""
    import json

    text = project.config.read_text()
    project.config.write_text(text.replace("sync:\n", "sync:\n  upload_max_bytes: 100\n", 1))
    src = project.root / "src"
    for name, data in (("small", b"s" * 10), ("big", b"B" * 200), ("small2", b"t" * 20)):
        (src / name).mkdir(parents=True)
        (src / name / "a.bin").write_bytes(data)

    def files(run_id: str) -> dict[str, bytes]:
        return {k: v for k, v in _tree(project, run_id).items() if k.startswith(("a", "d/"))}

    def refs(run_id: str) -> dict[str, int]:
        tree = _tree(project, run_id)
        prefix, out = "ff_artifact_refs/", {}
        for k, v in tree.items():
            if k.startswith(prefix):
                out[k[len(prefix) : -len(".json")]] = json.loads(v)["size_bytes"]
        return out

    def synced() -> None:
        report = project.sync()
        assert report.exit_code == 0, report
        verified = project.ff_sync("verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr

    run_id = project.spool(ACROSS, str(src), "", "small,big").strip()  # one batch
    synced()
    assert files(run_id) == {"d/a.bin/a.bin": b"s" * 10}
    assert refs(run_id) == {"a.bin": 200, "b/a.bin": 77, "d/a.bin": 200}
    project.spool(ACROSS, str(src), run_id, "small2")  # a later pass: the file again
    synced()
    assert files(run_id) == {"a.bin": b"t" * 20, "d/a.bin/a.bin": b"s" * 10}
    assert refs(run_id) == {"b/a.bin": 77, "d/a.bin": 200}
    assert _tree(project, run_id)["b/a.bin"] == b"s" * 10
    project.spool(ACROSS, str(src), run_id, "big")  # and referenced again
    synced()
    assert files(run_id) == {"d/a.bin/a.bin": b"s" * 10}
    assert refs(run_id) == {"a.bin": 200, "b/a.bin": 77, "d/a.bin": 200}
    project.spool(ACROSS, str(src), run_id, "big,small")  # one batch, the small one last
    synced()
    assert files(run_id) == {"a.bin": b"s" * 10, "d/a.bin/a.bin": b"s" * 10}
    assert refs(run_id) == {"b/a.bin": 77, "d/a.bin": 200}
