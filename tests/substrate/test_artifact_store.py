from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.errors import ArtifactNotFound, DigestMismatch, ValidationError
from formula_foundry.substrate import (
    ArtifactEntry,
    ArtifactStore,
    Digest,
    InvalidDigest,
    InvalidLogicalPath,
    ObjectCorrupt,
    SourceFileNotFound,
    StoreFormatError,
    StoreIOError,
)


def _objects(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in (store.root / "objects").rglob("*") if p.is_file())


def _tmp_files(store: ArtifactStore) -> list[Path]:
    return sorted((store.root / "tmp").iterdir())


def _flip_byte(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_add_file_entry_and_layout(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "coupon.kicad_pcb"
    data = os.urandom(9 * 1024 * 1024 + 17)  # several chunks, ragged end
    source.write_bytes(data)
    entry = store.add_file(source, logical_path="boards/coupon.kicad_pcb")
    hexdigest = hashlib.sha256(data).hexdigest()
    assert entry == ArtifactEntry("boards/coupon.kicad_pcb", f"sha256:{hexdigest}", len(data))
    obj = store.root / "objects" / hexdigest[:2] / hexdigest[2:]
    assert _objects(store) == [obj]
    assert obj.read_bytes() == data
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444
    assert store.path_for(entry.digest) == obj
    assert store.has(Digest.parse(entry.digest))
    assert _tmp_files(store) == []


def test_identical_content_is_stored_once(store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    first = store.add_file(tmp_path / "a", "a.txt")
    second = store.add_file(tmp_path / "b", "b.txt")
    third = store.add_bytes(b"same", "c.txt")
    assert first.digest == second.digest == third.digest
    assert (first.path, second.path, third.path) == ("a.txt", "b.txt", "c.txt")
    assert len(_objects(store)) == 1
    assert _tmp_files(store) == []


def test_add_bytes_and_open(store: ArtifactStore) -> None:
    entry = store.add_bytes(bytearray(b"hello world"), "greeting.txt")
    assert entry.size_bytes == 11
    with store.open(entry.digest) as f:
        assert f.read() == b"hello world"
    with store.open(entry.digest, verify=False) as f:
        f.seek(6)
        assert f.read() == b"world"
    empty = store.add_bytes(b"", "empty")
    assert empty.digest == f"sha256:{hashlib.sha256(b'').hexdigest()}"
    with store.open(empty.digest) as f:
        assert f.read() == b""


def test_missing_digest(store: ArtifactStore) -> None:
    absent = str(Digest.of_bytes(b"never stored"))
    assert not store.has(absent)
    with pytest.raises(ArtifactNotFound, match=absent):
        store.path_for(absent)
    with pytest.raises(ArtifactNotFound, match=absent):
        store.open(absent)
    with pytest.raises(ArtifactNotFound):
        store.verify(absent)
    with pytest.raises(InvalidDigest):
        store.has("sha256:XYZ")


def test_missing_source_leaves_nothing_behind(store: ArtifactStore, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file.bin"
    with pytest.raises(SourceFileNotFound) as info:
        store.add_file(missing, "x.bin")
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert _objects(store) == [] and _tmp_files(store) == []


def test_directory_source_is_an_error(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreIOError, match=str(tmp_path)):
        store.add_file(tmp_path, "dir")
    assert _tmp_files(store) == []


BAD_LOGICAL_PATHS = [
    "",
    "/etc/passwd",
    "../escape",
    "a/../../b",
    "a/..",
    "..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\..\\win",
    "C:/x",
    "c:x",
    "nul\x00byte",
    "new\nline",
]


@pytest.mark.parametrize("logical_path", BAD_LOGICAL_PATHS)
def test_bad_logical_paths_are_rejected(store: ArtifactStore, logical_path: str) -> None:
    with pytest.raises(InvalidLogicalPath) as info:
        store.add_bytes(b"x", logical_path)
    assert repr(logical_path) in str(info.value)
    assert isinstance(info.value, ValidationError)
    assert _objects(store) == []


_segment = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_segment, st.sampled_from(["..", ".", ""])), min_size=1, max_size=5))
def test_logical_paths_property(store: ArtifactStore, parts: list[str]) -> None:
    path = "/".join(parts)
    traversal = any(p in ("..", ".", "") for p in parts) or (
        len(path) >= 2 and path[1] == ":" and path[0].isascii() and path[0].isalpha()
    )
    if traversal:
        with pytest.raises(InvalidLogicalPath):
            store.add_bytes(b"x", path)
    else:
        assert store.add_bytes(b"x", path).path == path


def test_verify_detects_flipped_byte_and_quarantines(store: ArtifactStore, tmp_path: Path) -> None:
    good = store.add_bytes(b"good content " * 1000, "good.bin")
    bad = store.add_bytes(b"will be tampered " * 1000, "bad.bin")
    obj = store.path_for(bad.digest)
    _flip_byte(obj, 100)

    with pytest.raises(ObjectCorrupt) as info:
        store.verify(bad.digest)
    assert isinstance(info.value, DigestMismatch)
    assert str(info.value.expected) == bad.digest
    assert info.value.quarantined_to is not None and info.value.quarantined_to.exists()
    assert info.value.quarantined_to.parent == store.root / "quarantine"
    assert bad.digest in str(info.value)
    assert not store.has(bad.digest)
    with pytest.raises(ArtifactNotFound):
        store.open(bad.digest)
    store.verify(good.digest)  # intact objects pass silently

    restored = store.add_bytes(b"will be tampered " * 1000, "bad.bin")
    assert restored == bad
    store.verify(bad.digest)


def test_verify_all_reports_every_mismatch(store: ArtifactStore) -> None:
    entries = [store.add_bytes(f"object {i}".encode() * 100, f"o{i}") for i in range(5)]
    for entry in entries[1:3]:
        _flip_byte(store.path_for(entry.digest))
    report = store.verify_all()
    assert report.checked == 5 and not report.ok
    assert {str(c.expected) for c in report.corrupt} == {entries[1].digest, entries[2].digest}
    assert all(c.quarantined_to is not None and c.quarantined_to.exists() for c in report.corrupt)
    again = store.verify_all()
    assert again.ok and again.checked == 3


def test_open_never_serves_a_corrupt_object(store: ArtifactStore) -> None:
    entry = store.add_bytes(os.urandom(3 * 1024 * 1024), "data.bin")
    _flip_byte(store.path_for(entry.digest), 2 * 1024 * 1024)
    with pytest.raises(ObjectCorrupt), store.open(entry.digest) as f:
        f.read()
    assert not store.has(entry.digest)
    assert len(list((store.root / "quarantine").iterdir())) == 1


def test_truncated_object_is_replaced_on_add(store: ArtifactStore) -> None:
    data = b"0123456789" * 1000
    entry = store.add_bytes(data, "d")
    obj = store.path_for(entry.digest)
    os.chmod(obj, 0o644)
    obj.write_bytes(data[:10])
    assert store.add_bytes(data, "d") == entry
    store.verify(entry.digest)
    assert obj.read_bytes() == data


def test_cleanup_temp_removes_only_old_files(store: ArtifactStore) -> None:
    old = store.root / "tmp" / "host.1.dead.tmp"
    fresh = store.root / "tmp" / "host.2.live.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    stale = time.time() - 7200
    os.utime(old, (stale, stale))
    assert store.cleanup_temp(older_than_s=3600) == 1
    assert _tmp_files(store) == [fresh]


def test_store_marker_version_is_checked(tmp_path: Path) -> None:
    ArtifactStore(tmp_path / "s")
    marker = tmp_path / "s" / "store.json"
    assert b"formula-foundry/object-store" in marker.read_bytes()
    marker.write_bytes(b'{"format":"formula-foundry/object-store","version":99}')
    with pytest.raises(StoreFormatError, match="version 99"):
        ArtifactStore(tmp_path / "s")
    marker.write_bytes(b"[]")
    with pytest.raises(StoreFormatError, match="not describe"):
        ArtifactStore(tmp_path / "s")


def test_iter_digests_skips_stray_files(store: ArtifactStore) -> None:
    entry = store.add_bytes(b"x", "x")
    (store.root / "objects" / "zz").mkdir()
    (store.root / "objects" / "zz" / "junk").write_bytes(b"")
    (store.root / "objects" / ".nfs0001").write_bytes(b"")
    assert [str(d) for d in store.iter_digests()] == [entry.digest]


class _Trickle:
    """A stream that hands out at most ``step`` bytes per read, as a pipe may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.step, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("size_from_small", [-1, 0, 1, None])
@pytest.mark.parametrize("step", [1 << 30, 4096])
def test_copy_and_hash_around_the_small_file_bound(
    tmp_path: Path, size_from_small: int | None, step: int
) -> None:
    # Files within SMALL bytes are copied inline, larger ones by the writer thread: the bytes
    # and the digest are the same either way, also when reads come in small pieces.
    from formula_foundry.substrate.streaming import SMALL, copy_and_hash

    size = 0 if size_from_small is None else SMALL + size_from_small
    data = os.urandom(size)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        digest, n = copy_and_hash(_Trickle(data, step), fd, chunk_size=65536)
    finally:
        os.close(fd)
    assert (str(digest), n) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    assert out.read_bytes() == data
