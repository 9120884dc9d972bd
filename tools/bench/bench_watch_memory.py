#!/usr/bin/env python3
"""Does ``ff-sync watch`` keep its memory flat while it works for a long time?

Usage::

    python tools/bench/bench_watch_memory.py [--rounds 300] [--points 500] [--dir DIR]

In a temporary project with a SQLite store, ``ff-sync watch --interval 0.2`` runs as a child
process while this script keeps giving it work: each round a new run logs ``--points`` metric
points (10 keys), waits until the watcher has synced them (the sync state's size of the
segment), and every run is a new MLflow run. The watcher's resident memory (``VmRSS`` from
``/proc``) is sampled after each round. Printed: RSS after the first 10 rounds (warm: MLflow
imported, store open) and at the end, and their ratio — flat memory means a ratio near 1.00
however many rounds run. The baseline is the watcher itself early in the same script.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from formula_foundry.tracking import get_tracker
n = int(sys.argv[1])
with get_tracker().start_run(run_name=sys.argv[2]) as run:
    for i in range(n):
        run.log_metrics({f"k{j}": i * 0.5 + j for j in range(10)}, step=i)
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def synced_bytes(state_root: Path) -> int:
    """Bytes of spool the watcher has acknowledged (all destinations, read-only)."""
    total = 0
    for db in state_root.glob("*/state.sqlite3"):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                row = con.execute("SELECT COALESCE(SUM(byte_offset), 0) FROM segments").fetchone()
            finally:
                con.close()
        except sqlite3.OperationalError:
            continue  # not created yet, or busy: ask again
        total += int(row[0])
    return total


def spool_bytes(spool: Path) -> int:
    return sum(p.stat().st_size for p in spool.glob("*/seg-*.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    ff_sync = str(Path(sys.executable).with_name("ff-sync"))
    with tempfile.TemporaryDirectory(prefix="ff-bench-watch-", dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "config").mkdir()
        (root / "config" / "mlflow.yaml").write_text(
            "sync:\n  stale_after_s: 86400\n", encoding="utf-8"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_"))}
        watcher = subprocess.Popen(
            [ff_sync, "watch", "--interval", "0.2", "-q"],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        samples: list[float] = []
        started = time.monotonic()
        try:
            for r in range(args.rounds):
                subprocess.run(
                    [sys.executable, "-c", CHILD, str(args.points), f"round-{r}"],
                    cwd=root,
                    env=env,
                    check=True,
                )
                target = spool_bytes(root / "data" / "runs")
                deadline = time.monotonic() + 120
                while synced_bytes(root / "data" / "sync") < target:
                    if watcher.poll() is not None or time.monotonic() > deadline:
                        err = watcher.stderr.read().decode() if watcher.stderr else ""
                        raise SystemExit(f"watcher stopped or stuck in round {r}: {err}")
                    time.sleep(0.05)
                samples.append(rss_mib(watcher.pid))
        finally:
            watcher.send_signal(signal.SIGTERM)
            code = watcher.wait(timeout=120)
        elapsed = time.monotonic() - started
    warm = samples[min(9, len(samples) - 1)]
    end = samples[-1]
    points = args.rounds * args.points * 10
    print(
        f"ff-sync watch, {args.rounds} rounds x {args.points * 10} metric points "
        f"({points:,} points, {args.rounds} runs) in {elapsed:.0f} s; watcher exit {code}"
    )
    print(f"RSS after round 10      {warm:7.1f} MiB")
    mid = samples[len(samples) // 2]
    print(f"RSS after round {len(samples) // 2:<7} {mid:7.1f} MiB")
    print(f"RSS after round {len(samples):<7} {end:7.1f} MiB   {end / warm:.3f} x round 10")
    print(f"peak of the samples     {max(samples):7.1f} MiB")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
