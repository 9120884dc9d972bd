from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from formula_foundry.substrate import DeterminismConfig, Manifest, ManifestError

if TYPE_CHECKING:
    from .conftest import RunPython

STRICT = DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8")
EXPECTED_TAGS = {
    "git_sha",
    "design_doc_sha256",
    "environment_fingerprint",
    "determinism_mode",
    "seed_python",
    "seed_numpy",
    "seed_torch",
}


def _manifest(distributions: list[tuple[str, str]]) -> Manifest:
    return Manifest.from_environment(determinism=STRICT, distributions=distributions)


def test_from_environment_fields(project: Path, distributions: list[tuple[str, str]]) -> None:
    manifest = _manifest(distributions)
    design = (project / "docs" / "design.md").read_bytes()
    assert manifest.git_sha == "unknown"
    assert manifest.git_status == "not-a-repository"
    assert manifest.design_doc_path == "docs/design.md"
    assert manifest.design_doc_status == "present"
    assert manifest.design_doc_sha256 == hashlib.sha256(design).hexdigest()
    assert manifest.environment_fingerprint == str(manifest.environment.fingerprint)
    assert manifest.environment_fingerprint.startswith("sha256:")
    assert manifest.determinism_mode == "strict"
    assert manifest.seed == 42
    assert dict(manifest.seeds) == STRICT.seeds
    assert manifest.cublas_workspace_config == ":4096:8"


def test_missing_design_doc_is_explicit(
    project: Path, distributions: list[tuple[str, str]]
) -> None:
    (project / "docs" / "design.md").unlink()
    manifest = _manifest(distributions)
    assert manifest.design_doc_status == "missing"
    assert manifest.design_doc_sha256 == "missing:docs/design.md"
    assert manifest.to_tags()["design_doc_sha256"] == "missing:docs/design.md"


def test_to_tags_are_exactly_the_documented_ones(
    project: Path, distributions: list[tuple[str, str]]
) -> None:
    manifest = _manifest(distributions)
    tags = manifest.to_tags()
    assert set(tags) == EXPECTED_TAGS
    assert all(isinstance(v, str) for v in tags.values())
    assert tags["seed_python"] == str(STRICT.seeds["python"])
    assert tags["determinism_mode"] == "strict"
    off = Manifest.from_environment(distributions=distributions)
    assert set(off.to_tags()) == EXPECTED_TAGS - {"seed_python", "seed_numpy", "seed_torch"}


def test_canonical_bytes_do_not_depend_on_dict_order(
    project: Path, distributions: list[tuple[str, str]]
) -> None:
    manifest = _manifest(distributions)
    as_dict = manifest.to_dict()
    reordered = json.loads(json.dumps(dict(reversed(list(as_dict.items())))))
    reordered["seeds"] = dict(reversed(list(reordered["seeds"].items())))
    rebuilt = Manifest.from_dict(reordered)
    assert rebuilt == manifest
    assert rebuilt.canonical_bytes() == manifest.canonical_bytes()
    reversed_dists = Manifest.from_environment(
        determinism=STRICT, distributions=list(reversed(distributions))
    )
    assert reversed_dists.canonical_bytes() == manifest.canonical_bytes()


_CHILD = """
import sys
from formula_foundry.substrate import DeterminismConfig, Manifest
dists = None if sys.argv[1] == "installed" else [
    tuple(pair.split("==")) for pair in sys.argv[1].split(",")
]
m = Manifest.from_environment(
    determinism=DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8"),
    distributions=dists,
)
sys.stdout.write(m.canonical_bytes().hex())
"""


@pytest.mark.parametrize("source", ["controlled", "installed"])
def test_canonical_bytes_identical_across_processes(
    project: Path, run_python: RunPython, distributions: list[tuple[str, str]], source: str
) -> None:
    dists = distributions if source == "controlled" else None
    arg = ",".join(f"{n}=={v}" for n, v in distributions) if dists else "installed"
    mine = Manifest.from_environment(determinism=STRICT, distributions=dists).canonical_bytes()
    theirs = bytes.fromhex(run_python(_CHILD, arg, cwd=project).stdout)
    assert theirs == mine


def test_write_load_round_trip_and_file_hash(
    project: Path, distributions: list[tuple[str, str]]
) -> None:
    manifest = _manifest(distributions)
    path = project / "out" / "manifest.json"
    path.parent.mkdir()
    manifest.write(path)
    assert path.read_bytes() == manifest.canonical_bytes()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.digest.hexdigest
    assert Manifest.load(path) == manifest
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_works_inside_a_git_repository(project: Path, distributions: list[tuple[str, str]]) -> None:
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "docs"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "docs"], cwd=project, check=True)
    manifest = _manifest(distributions)
    assert len(manifest.git_sha) == 40 and manifest.git_status == "clean"
    assert manifest.to_tags()["git_sha"] == manifest.git_sha


def _tamper(path: Path, **changes: object) -> None:
    data = json.loads(path.read_bytes())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema_version": 2}, "schema_version 2 is not supported"),
        ({"kind": "something-else"}, "kind 'something-else'"),
        ({"environment_fingerprint": "sha256:" + "0" * 64}, "does not match its environment"),
        ({"seeds": {"python": 1}}, "not derived from seed"),
        ({"seed": True}, "field 'seed' has invalid value True"),
        ({"determinism_mode": "chaos"}, "determinism_mode 'chaos' is unknown"),
    ],
)
def test_load_rejects_invalid_manifests(
    project: Path, distributions: list[tuple[str, str]], changes: dict[str, object], message: str
) -> None:
    path = project / "manifest.json"
    _manifest(distributions).write(path)
    _tamper(path, **changes)
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.load(path)
    assert str(path) in str(info.value)


def test_load_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_bytes(b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "bad.json")
