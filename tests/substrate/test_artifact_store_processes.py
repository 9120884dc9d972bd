"""Several real processes against one store: concurrent writers and writers killed mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formula_foundry.substrate import ArtifactStore, Digest
from formula_foundry.substrate.digest import sha256_file

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and processes")

_ADDER = """
import json, sys, time
from pathlib import Path
from formula_foundry.substrate import ArtifactStore
store = ArtifactStore(Path(sys.argv[1]))
start = float(sys.argv[4])
while time.time() < start:  # line up all writers so they really overlap
    time.sleep(0.001)
entry = store.add_file(Path(sys.argv[2]), logical_path=sys.argv[3])
print(json.dumps([entry.path, entry.digest, entry.size_bytes]))
"""


def _spawn_adders(root: Path, sources: list[Path]) -> list[list[object]]:
    start = time.time() + 0.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ADDER, str(root), str(src), "shared.bin", str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for src in sources
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs)
    return [json.loads(out) for out in outputs]


def test_concurrent_add_of_same_content(tmp_path: Path) -> None:
    source = tmp_path / "same.bin"
    source.write_bytes(os.urandom(6 * 1024 * 1024))
    root = tmp_path / "store"
    entries = _spawn_adders(root, [source] * 6)
    digest, size = sha256_file(source)
    assert entries == [["shared.bin", str(digest), size]] * 6
    store = ArtifactStore(root)
    assert list(store.iter_digests()) == [digest]
    assert list((root / "tmp").iterdir()) == []
    assert store.verify_all().ok


def test_concurrent_add_of_different_content(tmp_path: Path) -> None:
    sources = []
    for i in range(6):
        src = tmp_path / f"src{i}.bin"
        src.write_bytes(os.urandom(2 * 1024 * 1024))
        sources.append(src)
    root = tmp_path / "store"
    entries = _spawn_adders(root, sources)
    expected = sorted(sha256_file(s)[0] for s in sources)
    assert sorted(Digest.parse(str(e[1])) for e in entries) == expected
    store = ArtifactStore(root)
    assert sorted(store.iter_digests()) == expected
    assert store.verify_all().checked == 6


def _wait_for_temp(tmp_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(tmp_dir.iterdir()) or proc.poll() is not None:
            return
        time.sleep(0.0005)
    raise AssertionError("child never started writing")


def test_sigkill_during_add_never_exposes_a_partial_object(tmp_path: Path) -> None:
    source = tmp_path / "large.bin"
    block = os.urandom(1024 * 1024)
    with source.open("wb") as f:
        for i in range(96):
            f.write(i.to_bytes(4, "big") + block[4:])
    expected, size = sha256_file(source)
    root = tmp_path / "store"
    store = ArtifactStore(root)
    rng = random.Random(1234)  # fixed delays: reproducible, spread over the whole write
    delays = [0.0, 0.0, *(rng.uniform(0.0, 0.35) for _ in range(4))]
    killed_mid_write = 0
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ADDER, str(root), str(source), "large.bin", "0"],
            stdout=subprocess.DEVNULL,
        )
        _wait_for_temp(root / "tmp", proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL and not store.has(expected):
            killed_mid_write += 1
        # Whatever the crash point: the object is absent, or present, complete and intact.
        assert set(store.iter_digests()) <= {expected}
        if store.has(expected):
            store.verify(expected)
            assert store.path_for(expected).stat().st_size == size
            store.path_for(expected).chmod(0o644)  # let the next round start from scratch
            store.path_for(expected).unlink()
    assert killed_mid_write >= 1, "no child was killed before publishing; test proves nothing"
    leftovers = list((root / "tmp").iterdir())
    assert leftovers, "a killed writer leaves its temporary file (never served)"
    assert store.cleanup_temp(older_than_s=0) == len(leftovers)
    entry = store.add_file(source, "large.bin")
    assert entry.digest == str(expected)
    store.verify(expected)
