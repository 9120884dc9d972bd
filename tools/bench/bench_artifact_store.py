#!/usr/bin/env python3
"""Benchmark ArtifactStore.add_file against ``sha256sum`` on the same file.

Usage::

    python tools/bench/bench_artifact_store.py [--size-mb 1024] [--runs 3] [--dir DIR]

Creates a file of ``--size-mb`` MiB in a temporary folder (under ``--dir``, so the source and
the stores share a filesystem), reads it once with ``sha256sum`` so both contenders start from
a warm page cache, then reports the best of ``--runs`` for each:

* ``sha256sum`` (subprocess): read + hash — the baseline;
* ``ArtifactStore.add_file`` into a fresh store: read + hash + write + fsync + publish.

The target is ``add_file`` throughput >= 0.80 x ``sha256sum``. Peak memory is the peak RSS
(``VmHWM``, else ``ru_maxrss``) of a child process doing one ``add_file`` of 100 MiB and one
of ``--size-mb``; streaming means the two must be about equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
TARGET_RATIO = 0.80

_MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
from formula_foundry.substrate import ArtifactStore

def peak():
    # VmHWM belongs to this exec'd image; ru_maxrss on Linux keeps the forking parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

store = ArtifactStore(Path(sys.argv[2]))
before = peak()
store.add_file(Path(sys.argv[1]), logical_path="bench.bin")
print(json.dumps({"before": before, "peak": peak()}))
"""


def make_file(path: Path, size_mb: int) -> None:
    """Write ``size_mb`` MiB of incompressible data quickly (random block, varied per MiB)."""
    block = os.urandom(16 * MIB)
    with path.open("wb") as f:
        written = 0
        while written < size_mb:
            step = min(16, size_mb - written)
            f.write(written.to_bytes(8, "big") + block[8 : step * MIB])
            written += step


def time_sha256sum(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_add_file(path: Path, store_root: Path) -> float:
    from formula_foundry.substrate import ArtifactStore

    store = ArtifactStore(store_root)
    start = time.perf_counter()
    store.add_file(path, logical_path="bench.bin")
    elapsed = time.perf_counter() - start
    shutil.rmtree(store_root)
    return elapsed


def peak_memory(path: Path, store_root: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(path), str(store_root)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    shutil.rmtree(store_root)
    result: dict[str, int] = json.loads(out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender; best is kept")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    if shutil.which("sha256sum") is None:
        print("sha256sum not found; install coreutils", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="ff-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        make_file(source, args.size_mb)
        size = source.stat().st_size
        time_sha256sum(source)  # warm the page cache for both contenders

        baseline = min(time_sha256sum(source) for _ in range(args.runs))
        ours = min(time_add_file(source, work / f"store-{i}") for i in range(args.runs))
        base_mbs = size / MIB / baseline
        ours_mbs = size / MIB / ours
        ratio = ours_mbs / base_mbs

        small = work / "small.bin"
        make_file(small, 100)
        mem_small = peak_memory(small, work / "mem-small")
        mem_large = peak_memory(source, work / "mem-large")

    print(f"file: {args.size_mb} MiB, best of {args.runs}, warm page cache")
    print(f"sha256sum                 {baseline:8.3f} s  {base_mbs:9.1f} MiB/s")
    print(f"ArtifactStore.add_file    {ours:8.3f} s  {ours_mbs:9.1f} MiB/s")
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"ratio add_file/sha256sum  {ratio:8.2f}    ({verdict} target {TARGET_RATIO:.2f})")
    for label, mem in (("100 MiB", mem_small), (f"{args.size_mb} MiB", mem_large)):
        print(
            f"peak RSS add_file {label:>9}: {mem['peak'] / MIB:7.1f} MiB "
            f"(after import {mem['before'] / MIB:.1f} MiB)"
        )
    growth = (mem_large["peak"] - mem_small["peak"]) / MIB
    print(f"peak RSS difference large - small: {growth:+.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
