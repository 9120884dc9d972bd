"""Entries name the store that holds them; without a root, the store and run directories use the
configured folders, found from any sub-folder of the project like the tracker finds them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from formula_foundry.substrate import ArtifactEntry, ArtifactStore, InvalidRunId, init_run_dir

if TYPE_CHECKING:
    from .conftest import RunPython

CONFIG = """\
artifacts:
  store_root: "store/objects-here"
spool:
  root: "spool/runs-here"
"""

CHILD = """
import json
from pathlib import Path
from formula_foundry.substrate import ArtifactStore, create_run, init_run_dir
from formula_foundry.substrate import Manifest

store = ArtifactStore()
entry = store.add_bytes(b"payload", "p.bin")
run = init_run_dir(run_id="run-001")
fresh = create_run(manifest=Manifest.from_environment(distributions=[]))
relative = ArtifactStore("rel-store")
print(json.dumps({
    "store": str(store.root),
    "entry_store": str(entry.store_root),
    "run_dir": str(run.run_dir),
    "fresh_parent": str(fresh.run_dir.parent),
    "relative": str(relative.root),
}))
"""


def test_default_roots_are_the_configured_ones_from_a_subfolder(
    tmp_path: Path, run_python: RunPython
) -> None:
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "config" / "mlflow.yaml").write_text(CONFIG, encoding="utf-8")
    cwd = project / "scripts" / "deeper"
    cwd.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("FF_CONFIG", "FF_SPOOL_ROOT")}

    out = json.loads(run_python(CHILD, cwd=cwd, env=env).stdout)

    assert Path(out["store"]) == project / "store" / "objects-here"
    assert Path(out["entry_store"]) == project / "store" / "objects-here"
    assert Path(out["run_dir"]) == (project / "spool" / "runs-here" / "run-001").resolve()
    assert Path(out["fresh_parent"]) == (project / "spool" / "runs-here").resolve()
    assert (project / "store" / "objects-here" / "store.json").is_file()
    # An explicit relative path stays relative to the working directory.
    assert Path(out["relative"]) == cwd / "rel-store"


def test_entries_name_the_store_that_holds_them(tmp_path: Path) -> None:
    first = ArtifactStore(tmp_path / "first")
    second = ArtifactStore(tmp_path / "second")
    source = tmp_path / "board.bin"
    source.write_bytes(b"board")
    entries = [
        (first, first.add_file(source, "board.bin")),
        (second, second.add_file(source, "board.bin")),
        (first, first.add_bytes(b"bytes", "b.bin")),
        (first, first.add_bytes(b"bytes", "b.bin")),  # already stored: the fast path
        (second, second.add_bytes(b"board", "board.bin")),
    ]
    for store, entry in entries:
        assert entry.store_root == store.root and entry.store_root.is_absolute()
    # Equality is about the mapping (logical path -> content), not where it is stored.
    assert entries[0][1] == entries[1][1]
    assert entries[0][1] == ArtifactEntry("board.bin", entries[0][1].digest, 5)
    assert ArtifactEntry("x", entries[0][1].digest, 5).store_root is None


def test_init_run_dir_without_run_id_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRunId, match="run_id"):
        init_run_dir(tmp_path)  # type: ignore[call-overload]
