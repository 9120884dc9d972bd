"""``ff-sync`` killed with SIGKILL in the middle of uploading logged files, again and again:
the final artifact trees are byte for byte the files logged, nothing is uploaded as a partial
file, and no temporary file is left in the destination."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.sync.conftest import FF_SYNC, Project

LOG = """
import sys
from pathlib import Path
with tracker.start_run(run_name="many-files") as run:
    run.log_artifact(Path(sys.argv[1]))
    run.log_metric("done", 1.0)
    print(run.run_id)
"""


def _files(root: Path, seed: int) -> dict[str, bytes]:
    """Many small files in a few folders and a few large ones: ~90 MB."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(150):
        out[f"small/{i % 7}/f{i:03d}.bin"] = rng.randbytes(rng.randint(0, 64 * 1024))
    for i in range(3):  # uploaded first (paths in order): a kill likely lands inside one
        out[f"large/model-{i}.bin"] = rng.randbytes(rng.randint(24, 32) * 1024 * 1024)
    for rel, data in out.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out


def _artifact_files(artifact_root: Path) -> dict[str, Path]:
    return {
        p.relative_to(artifact_root).as_posix(): p for p in artifact_root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_kills_mid_upload_leave_exactly_the_logged_files(project: Project, seed: int) -> None:
    data = _files(project.root / "src", seed)
    run_id = project.spool(LOG, str(project.root / "src")).strip()
    artifacts = project.root / "data" / "mlflow" / "artifacts"
    rng = random.Random(seed)
    kills = 0
    for _ in range(12):
        before = len(_artifact_files(artifacts)) if artifacts.exists() else 0
        proc = subprocess.Popen(
            [FF_SYNC, "--config", str(project.config)],
            cwd=project.root,
            env=project.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait until this pass is uploading (a new file appears), then kill it a moment later.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if artifacts.exists() and len(_artifact_files(artifacts)) > before:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))  # uploads are fast: kill soon after they start
        if proc.poll() is not None:
            break  # this pass finished: everything is uploaded
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
    assert kills >= 1, "the passes ended before they could be killed mid-upload"
    final = project.ff_sync()
    assert final.returncode == 0, final.stderr
    (folder,) = artifacts.glob("*/*/artifacts")
    found = _artifact_files(folder)
    leftovers = [p for p in found if Path(p).name.startswith(".artifact.uploading.")]
    assert leftovers == []
    assert {p: f.read_bytes() for p, f in found.items()} == {
        f"src/{rel}": content for rel, content in data.items()
    }
    assert project.snapshot()["runs"][run_id]["metrics"]["done"]
    verified = project.ff_sync("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_temporary_file_left_by_a_killed_upload_is_removed(project: Project) -> None:
    # What a pass killed inside MLflow's copy leaves: the hidden file MLflow renames into place
    # when the copy completes. The next upload into that folder removes it.
    src = project.root / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.txt").write_text("1")
    project.spool(
        """
        import sys
        from pathlib import Path
        with tracker.start_run() as run:
            run.log_artifact(Path(sys.argv[1]) / "a" / "one.txt", "a")
        """,
        str(src),
    )
    assert project.sync().exit_code == 0
    (folder,) = (project.root / "data" / "mlflow" / "artifacts").glob("*/*/artifacts/a")
    left = folder / ".artifact.uploading.k1ll3d"
    left.write_bytes(b"half a file")
    (src / "a" / "two.txt").write_text("2")
    project.spool(
        """
        import sys
        from pathlib import Path
        run_id = next(p.name for p in Path("data/runs").iterdir())
        with tracker.start_run(run_id=run_id) as run:
            run.log_artifact(Path(sys.argv[1]) / "a" / "two.txt", "a")
        """,
        str(src),
    )
    assert project.sync().exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["one.txt", "two.txt"]
