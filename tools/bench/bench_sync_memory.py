#!/usr/bin/env python3
"""Peak memory of an ``ff-sync`` pass: does it grow with the size of the spool?

Usage::

    python tools/bench/bench_sync_memory.py [--small-mb 100] [--big-mb 1024] [--repeat 3]
                                            [--dir DIR]

Two spools are written with the real tracker (20 runs, ``log_metrics`` of 10 keys per call,
200-character keys so that a gigabyte is a few million points rather than tens of millions),
then each is synced by a fresh ``ff-sync`` process into a fresh SQLite store. The peak resident
memory of each process comes from ``wait4``'s rusage (``ru_maxrss``). The baselines, measured the
same way in the same script, are processes that only import MLflow and open the same kind of
store (what any MLflow client pays before it writes anything): with every import, and with
pandas, SciPy and PyArrow hidden as the ``ff-sync`` command hides them.

Each spool is synced ``--repeat`` times (small, big, small, big, ...), each time by a fresh
process into a fresh store with a fresh sync state. Printed: peak RSS of the baseline, of each
sync, and per round the ratio big/small (flat memory: close to 1.00) and the increment of each
sync over the lean baseline; then the median and range over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 20
KEYS = 10
WRITER = """
import sys
from formula_foundry.tracking import get_tracker
budget, runs, keys = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
names = [f"layer{k}".ljust(200, "_") for k in range(keys)]
tracker = get_tracker()
for r in range(runs):
    with tracker.start_run(run_name=f"mem-{r}") as run:
        step, written = 0, 0
        while written < budget // runs:
            run.log_metrics({n: step * 0.5 + i for i, n in enumerate(names)}, step=step)
            written += 2120  # bytes of one such line, near enough
            step += 1
"""
BASELINE = """
import sys
if sys.argv[2] == "lean":
    from formula_foundry.sync.mlflow.lean_imports import hide_unused_modules
    hide_unused_modules()
from formula_foundry.sync.engine.sync_pass import load_sync_settings
from formula_foundry.sync.mlflow.client_sink import open_sink
open_sink(load_sync_settings(sys.argv[1])).close()
"""


def peak_rss_mib(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run ``cmd``; return (peak RSS MiB, seconds, exit code) of that process alone."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.monotonic() - start, proc.returncode


def spool_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*/seg-*.jsonl"))


def write_spool(project: Path, megabytes: int, env: dict[str, str]) -> int:
    """Spool about ``megabytes`` MiB of metric points; return the exact size in bytes."""
    (project / "config").mkdir(parents=True)
    (project / "config" / "mlflow.yaml").write_text(
        "sync:\n  stale_after_s: 86400\n", encoding="utf-8"
    )
    budget = megabytes * 1024 * 1024
    subprocess.run(
        [sys.executable, "-c", WRITER, str(budget), str(RUNS), str(KEYS)],
        cwd=project,
        env=env,
        check=True,
    )
    return spool_size(project / "data" / "runs")


def _fresh_destination(project: Path) -> None:
    """Forget what an earlier round synced: the store, its artifacts, the sync state."""
    for folder in (project / "data" / "mlflow", project / "data" / "sync"):
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both syncs")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    ff_sync = str(Path(sys.executable).with_name("ff-sync"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_"))}
    peaks: dict[str, list[float]] = {"small": [], "big": []}
    with tempfile.TemporaryDirectory(prefix="ff-bench-mem-", dir=args.dir) as tmp:
        sizes = {}
        for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
            sizes[name] = write_spool(Path(tmp) / name, mb, env)
        for i in range(args.repeat):
            for name in ("small", "big"):
                project = Path(tmp) / name
                _fresh_destination(project)
                rss, secs, code = peak_rss_mib([ff_sync, "-q"], project, env)
                if code != 0:
                    raise SystemExit(f"ff-sync exited {code} on the {name} spool")
                peaks[name].append(rss)
                print(
                    f"round {i + 1}, {name}: {sizes[name] / 2**20:6.0f} MiB spool synced in "
                    f"{secs:5.0f} s, peak {rss:.1f} MiB",
                    flush=True,
                )
        base_project = Path(tmp) / "small"
        config = str(base_project / "config" / "mlflow.yaml")
        bases = {}
        for kind in ("full", "lean"):
            cmd = [sys.executable, "-c", BASELINE, config, kind]
            bases[kind], _, code = peak_rss_mib(cmd, base_project, env)
            if code != 0:
                raise SystemExit("the baseline process failed")
    base = bases["lean"]
    print(
        f"baseline: import MLflow and open a SQLite store: peak {bases['full']:.1f} MiB, "
        f"{base:.1f} MiB without pandas/SciPy/PyArrow (as ff-sync imports it)"
    )
    ratios = [b / s for s, b in zip(peaks["small"], peaks["big"], strict=True)]
    for name in ("small", "big"):
        p, median = sorted(peaks[name]), statistics.median(peaks[name])
        print(
            f"peak RSS {name}: median {median:.1f} MiB (+{median - base:.1f} over baseline), "
            f"range {p[0]:.1f}-{p[-1]:.1f} MiB"
        )
    r = sorted(ratios)
    print(f"big / small: median {statistics.median(r):.3f}, range {r[0]:.3f}-{r[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
