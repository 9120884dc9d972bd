"""The store never follows a symbolic link inside its tree (only the root may be one).

Real links on a real filesystem: a linked fan-out folder must not receive objects, a linked
object must not read as stored, and verify_all must name each link and leave it alone.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from formula_foundry.errors import SubstrateError
from formula_foundry.substrate import ArtifactStore, Digest, UnsafeStorePath

DATA = b"real object content\n" * 50


def _object_path(store: ArtifactStore, digest: Digest) -> Path:
    return store.root / "objects" / digest.hexdigest[:2] / digest.hexdigest[2:]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_linked_fanout_folder_is_never_written_through(
    store: ArtifactStore, tmp_path: Path
) -> None:
    digest = Digest.of_bytes(DATA)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fanout = store.root / "objects" / digest.hexdigest[:2]
    fanout.symlink_to(elsewhere, target_is_directory=True)
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)

    with pytest.raises(UnsafeStorePath, match="symbolic link") as info:
        store.add_bytes(DATA, "a.bin")
    assert info.value.path == fanout and str(fanout) in str(info.value)
    assert isinstance(info.value, SubstrateError)
    with pytest.raises(UnsafeStorePath, match=str(fanout)):
        store.add_file(source, "a.bin")
    assert list(elsewhere.iterdir()) == []  # nothing landed outside the store
    assert list((store.root / "tmp").iterdir()) == []

    # Reads refuse too, even once the target holds a same-named file with the right content.
    (elsewhere / digest.hexdigest[2:]).write_bytes(DATA)
    assert not store.has(digest)
    for read in (store.path_for, store.open, store.verify):
        with pytest.raises(UnsafeStorePath, match=str(fanout)):
            read(digest)
    assert list(store.iter_digests()) == []
    report = store.verify_all()
    assert report.unsafe == (fanout,) and not report.ok and report.checked == 0
    assert fanout.is_symlink() and _tree(elsewhere) == {digest.hexdigest[2:]: DATA}

    # Once the link is removed the store works normally again.
    fanout.unlink()
    assert store.add_bytes(DATA, "a.bin").digest == str(digest)
    assert store.verify_all().ok


@pytest.mark.parametrize("target_content", [b"fake" * 250, DATA], ids=["same-size", "same"])
def test_linked_object_does_not_read_as_stored(
    store: ArtifactStore, tmp_path: Path, target_content: bytes
) -> None:
    digest = Digest.of_bytes(DATA)
    assert len(target_content) == len(DATA)
    other = store.add_bytes(b"another object", "other.bin")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(target_content)
    obj = _object_path(store, digest)
    obj.parent.mkdir(exist_ok=True)
    obj.symlink_to(outside)

    assert not store.has(digest)
    for call in (
        lambda: store.add_bytes(DATA, "a.bin"),
        lambda: store.path_for(digest),
        lambda: store.open(digest),
        lambda: store.open(digest, verify=False),
        lambda: store.verify(digest),
    ):
        with pytest.raises(UnsafeStorePath, match="symbolic link") as info:
            call()
        assert info.value.path == obj
    report = store.verify_all()
    assert report.unsafe == (obj,) and report.corrupt == () and report.checked == 1
    assert [str(d) for d in store.iter_digests()] == [other.digest]
    # Never moved, never followed for writing: the link and its target are as they were.
    assert obj.is_symlink() and outside.read_bytes() == target_content
    assert list((store.root / "quarantine").iterdir()) == []


def test_fifo_at_an_object_name_is_reported_not_waited_on(store: ArtifactStore) -> None:
    digest = Digest.of_bytes(DATA)
    obj = _object_path(store, digest)
    obj.parent.mkdir()
    os.mkfifo(obj)
    assert not store.has(digest)
    with pytest.raises(UnsafeStorePath, match="not a regular file"):
        store.open(digest)
    assert store.verify_all().unsafe == (obj,)


@pytest.mark.parametrize("name", ["objects", "tmp", "quarantine", "store.json"])
def test_linked_layout_entry_refuses_to_open_the_store(tmp_path: Path, name: str) -> None:
    root = tmp_path / "store"
    ArtifactStore(root)
    entry = root / name
    moved = tmp_path / f"moved-{name}"
    entry.rename(moved)
    entry.symlink_to(moved)
    with pytest.raises(UnsafeStorePath, match="symbolic link") as info:
        ArtifactStore(root)
    assert info.value.path == entry


def test_store_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "scratch" / "artifacts"
    real.mkdir(parents=True)
    link = tmp_path / "artifacts"
    link.symlink_to(real, target_is_directory=True)
    store = ArtifactStore(link)
    entry = store.add_bytes(DATA, "a.bin")
    assert entry.store_root == link
    with store.open(entry.digest) as f:
        assert f.read() == DATA
    assert store.has(entry.digest) and store.verify_all().ok
    digest = Digest.parse(entry.digest)
    assert (real / "objects" / digest.hexdigest[:2] / digest.hexdigest[2:]).read_bytes() == DATA


def test_unsafe_store_path_survives_pickling(tmp_path: Path) -> None:
    error = UnsafeStorePath(tmp_path / "x", "is a symbolic link inside the artifact store")
    again = pickle.loads(pickle.dumps(error))
    assert again.path == error.path and str(again) == str(error)


def test_file_where_a_fanout_folder_belongs_is_named(store: ArtifactStore) -> None:
    digest = Digest.of_bytes(DATA)
    blocker = store.root / "objects" / digest.hexdigest[:2]
    blocker.write_bytes(b"not a folder")
    with pytest.raises(UnsafeStorePath, match="not a folder") as info:
        store.add_bytes(DATA, "a.bin")
    assert info.value.path == blocker
    assert not store.has(digest)
    assert store.verify_all().unsafe == (blocker,)
