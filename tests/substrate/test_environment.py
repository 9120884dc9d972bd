from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

import pytest

from formula_foundry.substrate.environment import (
    describe_environment,
    design_doc_info,
    find_project_root,
    git_info,
    installed_distributions,
)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_project_root_is_nearest_ancestor_with_config_or_git(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "pkg" / "inner"
    (inner / "deep").mkdir(parents=True)
    (outer / "config").mkdir()
    assert find_project_root(inner / "deep") == outer.resolve()
    (inner / ".git").mkdir()
    assert find_project_root(inner / "deep") == inner.resolve()


def test_project_root_falls_back_to_start(tmp_path: Path) -> None:
    assert find_project_root(tmp_path) == tmp_path.resolve()


def test_git_outside_a_repository(tmp_path: Path) -> None:
    info = git_info(tmp_path)
    assert (info.sha, info.status) == ("unknown", "not-a-repository")


def test_git_clean_dirty_and_untracked(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    assert git_info(tmp_path).status == "no-commits"
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_info(tmp_path).sha == head
    assert git_info(tmp_path).status == "clean"
    (tmp_path / "untracked.txt").write_text("run output\n")
    assert git_info(tmp_path).status == "clean"
    (tmp_path / "a.txt").write_text("two\n")
    assert (git_info(tmp_path).sha, git_info(tmp_path).status) == (head, "dirty")


def test_git_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin-here"))
    assert git_info(tmp_path).status == "git-unavailable"


def test_design_doc_default_env_and_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FF_DESIGN_DOC", raising=False)
    missing = design_doc_info(project_root=tmp_path)
    assert (missing.status, missing.sha256) == ("missing", "missing:docs/design.md")

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_bytes(b"design v1\n")
    present = design_doc_info(project_root=tmp_path)
    assert present.status == "present"
    assert present.sha256 == hashlib.sha256(b"design v1\n").hexdigest()
    assert present.sha256 != hashlib.sha256(b"").hexdigest()

    (tmp_path / "other.md").write_bytes(b"other\n")
    monkeypatch.setenv("FF_DESIGN_DOC", "other.md")
    from_env = design_doc_info(project_root=tmp_path)
    assert (from_env.path, from_env.sha256) == ("other.md", hashlib.sha256(b"other\n").hexdigest())

    explicit = design_doc_info(tmp_path / "nope.md", project_root=tmp_path)
    assert explicit.sha256 == "missing:nope.md"


def test_fingerprint_identical_lists_match_regardless_of_order_and_spelling() -> None:
    a = describe_environment([("NumPy", "2.0.0"), ("orjson", "3.10.0")])
    b = describe_environment([("orjson", "3.10.0"), ("numpy", "2.0.0"), ("numpy", "2.0.0")])
    assert a.fingerprint == b.fingerprint
    assert a.distributions == (("numpy", "2.0.0"), ("orjson", "3.10.0"))


def test_fingerprint_changes_with_any_package_change() -> None:
    base = [("numpy", "2.0.0"), ("orjson", "3.10.0")]
    fingerprint = describe_environment(base).fingerprint
    upgraded = describe_environment([("numpy", "2.0.1"), ("orjson", "3.10.0")]).fingerprint
    added = describe_environment([*base, ("torch", "2.3.0")]).fingerprint
    removed = describe_environment(base[:1]).fingerprint
    assert len({fingerprint, upgraded, added, removed}) == 4


def test_fingerprint_of_installed_distributions_is_stable() -> None:
    installed = installed_distributions()
    assert ("orjson", importlib.metadata.version("orjson")) in installed
    assert describe_environment().fingerprint == describe_environment(installed).fingerprint
