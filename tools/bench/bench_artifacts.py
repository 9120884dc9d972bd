#!/usr/bin/env python3
"""Benchmark the files logged to runs: ff-sync's upload against a plain MLflow upload.

Usage::

    python tools/bench/bench_artifacts.py [--small 2000] [--small-max-kib 64]
                                          [--large 4] [--large-mib 64] [--repeat 3]
                                          [--server] [--no-rss] [--cold] [--crash] [--crash-mb 1024]
                                          [--crash-kills 12] [--crash-max-delay 0.2]
                                          [--profile] [--seed 1] [--dir DIR] [--json]

One tree is written once: ``--small`` files of 1 byte to ``--small-max-kib`` KiB in 20
folders and ``--large`` files of ``--large-mib`` MiB (random bytes, nothing deduplicates).

1. Upload throughput. Each round, into fresh destinations of the same kind, in alternating
   order:

   * ff-sync: a fresh project logs the tree with the tracker (``Run.log_artifact(tree)``, in a
     child process), then ONE IN-PROCESS ``sync_once`` pass is timed whole: read the spool,
     create the experiment and the run, check each object, upload every file through MLflow's
     client, list the destination, record progress, end the run;
   * plain: ``MlflowClient().log_artifacts(run_id, tree, "<tree name>")`` into a run created
     beforehand; the ratio uses that call alone (the baseline pays for nothing else). Also
     printed: the ratio against the plain side with its experiment and run created and ended
     (what the pass does too), and the ratio of the best times of each side (the machine is
     shared: the best time is the one least disturbed), and the ratio of CPU seconds (user and
   system) of each side. ``--cold`` (root only) empties the page cache before each side: with
   a warm cache, copying 320 MiB takes as long as the kernel needs to reclaim memory for it,
   which varies from round to round far more than either side's work (docs/performance.md).

   Destination: a fresh SQLite store (copied from one MLflow migrated beforehand, so neither
   side pays the migration) with a local artifact root; ``--server`` also does it through an
   ``mlflow server`` on 127.0.0.1 serving the artifacts (``mlflow-artifacts:``, one worker,
   tests/_services.py), one server for every round. Target: median ff-sync / plain >= 0.8.
   The logging side is printed for information: the tracker's ``log_artifact`` of the tree
   (hash, copy, fsync per object) vs ``shutil.copytree`` and vs a copy with an fsync per file.

2. Peak RSS (skipped by ``--no-rss``): a spool with metrics and the tree, another with the same
   metrics and no file; each synced ``--repeat`` times by the ``ff-sync`` command into a fresh
   (pre-migrated) SQLite store. A small launcher process runs ``ff-sync`` and reports
   ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the launcher's own few MiB are all a child can
   inherit). Target: with files / without <= 1.10.

3. ``--crash``: a ``--crash-mb`` set (3000 small files in 20 folders, 6 large ones spread
   among them) logged once, the ``ff-sync`` command started again and again and killed with
   SIGKILL a random delay (0..``--crash-max-delay`` s) after a new file (or MLflow's temporary
   file) appears in the destination, until ``--crash-kills`` kills or a pass ends by itself;
   then a final pass (SQLite store, local artifact root). PASS: at least 2 kills landed, the
   final tree holds byte for byte the files logged, no ``.artifact.uploading.*`` temporary
   file is left, and ``ff-sync verify`` agrees.

``--profile``: after the rounds of each destination, one more ff-sync pass of the tree under
cProfile; its top functions by own and by cumulative time.

Exit status 1 when the ``--crash`` verdict fails; missed performance goals only print MISSED.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import filecmp
import io
import json
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.8  # ff-sync upload throughput / plain MlflowClient.log_artifacts
RSS_TARGET = 1.10  # peak RSS of the pass with files / without
HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
PYTHON = sys.executable
FF_SYNC = str(Path(PYTHON).with_name("ff-sync"))
TEMP_PREFIX = ".artifact.uploading."  # MLflow's local artifact store's temporary files
MIB = 1024 * 1024

CONFIG = """\
tracking:
  backend_store_uri: "{backend}"
  artifact_root: "data/mlflow/artifacts"
spool:
  root: "data/runs"
artifacts:
  store_root: "data/artifacts"
sync:
  state_dir: "data/sync"
  stale_after_s: 86400
"""

# Logs one run (params, ``steps`` x 20 metrics, the tree unless told not to) with the real
# tracker, and times the plain copies the tracker's logging is compared with.
_LOG_CHILD = """
import json, os, shutil, sys, time
from pathlib import Path
from formula_foundry.tracking import get_tracker

tree, with_files, copy_to = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[4]
steps = int(sys.argv[3])
out = {}
if copy_to:
    os.sync()
    t0 = time.perf_counter()
    shutil.copytree(tree, Path(copy_to) / "plain")
    out["copy_s"] = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    for src in sorted(p for p in tree.rglob("*") if p.is_file()):
        dst = Path(copy_to) / "fsync" / src.relative_to(tree)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
    out["copy_fsync_s"] = time.perf_counter() - t0
    shutil.rmtree(copy_to)
tracker = get_tracker()
with tracker.start_run(run_name="bench-artifacts") as run:
    run.log_params({f"param{i}": i for i in range(10)})
    for s in range(steps):
        run.log_metrics({f"key{k}": s * 0.5 + k for k in range(20)}, step=s)
    if with_files:
        os.sync()
        t0 = time.perf_counter()
        run.log_artifact(tree)
        out["log_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""

# Runs a command and reports the peak RSS of its process (the launcher stays a few MiB: -S).
_LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.monotonic()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
secs = time.monotonic() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc, "peak_kib": peak, "secs": secs}))
"""


# -- the data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    root: Path
    files: int
    size: int


def make_tree(
    root: Path,
    small: int,
    small_max_kib: int,
    large: list[int],
    seed: int,
    *,
    spread: bool = False,
) -> Tree:
    """Small files in 20 folders and large ones in a folder of their own (``spread``: each in
    another of the small files' folders), of random bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(small):
        path = root / "small" / f"d{i % 20:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1, small_max_kib * 1024))
        path.write_bytes(data)
        total += len(data)
    (root / "large").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(large):
        folder = root / "small" / f"d{i * 20 // len(large):02d}" if spread else root / "large"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"model-{i}.bin", "wb") as f:
            left = size
            while left:
                chunk = rng.randbytes(min(left, 8 * MIB))
                f.write(chunk)
                left -= len(chunk)
        total += size
    return Tree(root, small + len(large), total)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_"))}


def new_project(root: Path, backend: str) -> Path:
    """A project folder with its config; returns the config file."""
    config = root / "config" / "mlflow.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(CONFIG.format(backend=backend), encoding="utf-8")
    return config


def log_run(
    config: Path,
    tree: Tree,
    *,
    with_files: bool = True,
    steps: int = 0,
    copy_to: Path | None = None,
) -> dict[str, float]:
    """Log one run into the project of ``config`` in a child process; its timings."""
    env = {**clean_env(), "FF_CONFIG": str(config)}
    args = [str(tree.root), "1" if with_files else "0", str(steps), str(copy_to or "")]
    done = subprocess.run(
        [PYTHON, "-c", _LOG_CHILD, *args],
        cwd=config.parent.parent,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def migrated_template(folder: Path) -> Path:
    """A SQLite file holding MLflow's empty, migrated schema, copied for each store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = folder / "template.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", str(folder / "unused-artifacts"))  # type: ignore[no-untyped-call]
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(f"sqlite:///{db}", None)
    return db


def sqlite_store(template: Path, db: Path) -> str:
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def files_under(root: Path) -> dict[str, Path]:
    """Every file under ``root`` (temporaries included) by its POSIX path inside it."""
    out = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            out[path.relative_to(root).as_posix()] = path
    return out


# -- 1. throughput ---------------------------------------------------------------------------


@dataclass
class Round:
    plain_s: float
    plain_whole_s: float
    ff_s: float
    plain_cpu_s: float
    ff_cpu_s: float
    log_s: float
    copy_s: float
    copy_fsync_s: float


# --cold: the page cache is emptied before each side (root only), so that neither side's time
# depends on how much memory the kernel must first reclaim from earlier rounds' files; both
# then read their sources from the disk.
_COLD = False


def _settle() -> None:
    """Before a timed side: everything written so far on disk (and --cold: the cache empty)."""
    os.sync()
    if _COLD:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


def run_ff_sync(
    config: Path, tree: Tree, profile: cProfile.Profile | None = None
) -> tuple[float, float]:
    """One in-process ``sync_once`` pass, timed whole (seconds, CPU seconds of the process:
    user and system, the kernel's copies included); it must upload every file."""
    from formula_foundry.sync import load_sync_settings, sync_once

    settings = load_sync_settings(config)
    _settle()
    start, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    report = sync_once(settings)
    if profile is not None:
        profile.disable()
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    if report.exit_code != 0 or report.files != tree.files:
        raise SystemExit(
            f"ff-sync pass of {config}: exit {report.exit_code}, {report.files} files uploaded "
            f"of {tree.files}: {report.summary()}"
        )
    return secs, cpu


def run_plain(
    uri: str, tree: Tree, artifact_location: str | None, name: str
) -> tuple[float, float, float]:
    """``MlflowClient.log_artifacts`` of the tree into a run created beforehand: the seconds of
    that call, of the whole (create the experiment and the run, upload, end the run), and the
    CPU seconds of that call."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    _settle()
    start = time.perf_counter()
    exp = client.create_experiment(name, artifact_location=artifact_location)
    run_id = client.create_run(exp).info.run_id
    upload_start, cpu = time.perf_counter(), time.process_time()
    client.log_artifacts(run_id, str(tree.root), tree.root.name)
    secs, cpu = time.perf_counter() - upload_start, time.process_time() - cpu
    client.set_terminated(run_id)
    whole = time.perf_counter() - start
    listed = client.list_artifacts(run_id, f"{tree.root.name}/large")
    if len(listed) != sum(1 for _ in (tree.root / "large").iterdir()):
        raise SystemExit(f"the plain upload into {uri} is incomplete")
    return secs, whole, cpu


def throughput_round(
    i: int, kind: str, work: Path, tree: Tree, template: Path, server_uri: str | None
) -> Round:
    project = work / f"{kind}-{i}"
    if kind == "sqlite":
        backend = sqlite_store(template, project / "data" / "mlflow" / "mlruns.db")
    else:
        assert server_uri is not None
        backend = server_uri
    config = new_project(project, backend)
    logged = log_run(config, tree, copy_to=work / f"copies-{i}")
    ff_s = plain_s = plain_whole_s = ff_cpu = plain_cpu = 0.0
    for side in ("plain", "ff") if i % 2 == 0 else ("ff", "plain"):
        if side == "ff":
            ff_s, ff_cpu = run_ff_sync(config, tree)
        elif kind == "sqlite":
            uri = sqlite_store(template, work / f"plain-{i}" / "mlruns.db")
            location = (work / f"plain-{i}" / "artifacts").as_uri()
            plain_s, plain_whole_s, plain_cpu = run_plain(uri, tree, location, f"plain-{i}")
        else:
            assert server_uri is not None
            plain_s, plain_whole_s, plain_cpu = run_plain(
                server_uri, tree, None, f"plain-{kind}-{i}"
            )
    if kind == "sqlite" and tree.files:  # keep the disk small: checked, no longer needed
        (folder,) = (project / "data" / "mlflow" / "artifacts").glob("*/*/artifacts")
        found = files_under(folder)
        if len(found) != tree.files:
            raise SystemExit(f"ff-sync left {len(found)} files in {folder}, not {tree.files}")
    shutil.rmtree(work / f"plain-{i}", ignore_errors=True)
    shutil.rmtree(project)
    return Round(
        plain_s,
        plain_whole_s,
        ff_s,
        plain_cpu,
        ff_cpu,
        logged["log_s"],
        logged["copy_s"],
        logged["copy_fsync_s"],
    )


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def report_throughput(kind: str, tree: Tree, rounds: list[Round]) -> dict[str, Any]:
    mb = tree.size / MIB
    print(f"\n== upload throughput, {kind} destination ({tree.files} files, {mb:.0f} MiB) ==")
    print("round  plain log_artifacts   ff-sync pass (sync_once)   ratio ff/plain")
    ratios = []
    for i, r in enumerate(rounds):
        ratio = r.plain_s / r.ff_s
        ratios.append(ratio)
        print(
            f"{i:5d}  {r.plain_s:6.2f} s {mb / r.plain_s:7.1f} MiB/s"
            f"   {r.ff_s:6.2f} s {mb / r.ff_s:7.1f} MiB/s        {ratio:5.2f}"
        )
    verdict = "met" if statistics.median(ratios) >= TARGET_RATIO else "MISSED"
    print(f"ratio ff-sync / plain: {spread(ratios)}; target >= {TARGET_RATIO}: {verdict}")
    # Best of the rounds: what each side does when nothing else on the machine gets in its way.
    best = min(r.plain_s for r in rounds) / min(r.ff_s for r in rounds)
    print(f"ratio of the best times: {best:.2f}")
    whole = [r.plain_whole_s / r.ff_s for r in rounds]
    print(
        "ratio against plain with its experiment and run created and ended (like for like): "
        + spread(whole)
    )
    # CPU seconds of this process (user and system: the kernel's copies of the bytes too):
    # what each side costs, without the waits for the disk's write-back, which vary from round
    # to round on a shared machine far more than either side's own work.
    cpu = [r.plain_cpu_s / r.ff_cpu_s for r in rounds]
    print("ratio of CPU seconds (user + system), ff-sync / plain: " + spread(cpu))
    out: dict[str, Any] = {
        "ratios": ratios,
        "best_ratio": best,
        "cpu_ratios": cpu,
        "whole_ratios": whole,
        "target_met": verdict == "met",
    }
    if kind == "sqlite":
        log = [r.log_s for r in rounds]
        print("logging side (information):")
        for name, attr in (
            ("shutil.copytree", "copy_s"),
            ("copy + fsync per file", "copy_fsync_s"),
        ):
            base = [getattr(r, attr) for r in rounds]
            ratio_log = [b / t for b, t in zip(base, log, strict=True)]
            print(
                f"  tracker log_artifact {statistics.median(log):6.2f} s vs {name} "
                f"{statistics.median(base):6.2f} s: throughput ratio {spread(ratio_log)}"
            )
            out[f"log_vs_{attr}"] = ratio_log
    return out


# -- 2. peak RSS -----------------------------------------------------------------------------


def peak_rss(config: Path, uri: str) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one ``ff-sync`` command into ``uri``."""
    cmd = [PYTHON, "-S", "-c", _LAUNCHER, FF_SYNC, "-q", "--config", str(config)]
    cmd += ["--tracking-uri", uri]
    env = {**clean_env(), "FF_CONFIG": str(config)}
    done = subprocess.run(
        cmd, cwd=config.parent.parent, env=env, check=True, capture_output=True, text=True
    )
    got = json.loads(done.stdout)
    if got["rc"] != 0:
        raise SystemExit(f"ff-sync exited {got['rc']} syncing {config}")
    return got["peak_kib"] / 1024, got["secs"]


def rss(work: Path, tree: Tree, template: Path, repeat: int, steps: int) -> dict[str, Any]:
    configs = {}
    for kind in ("with", "without"):
        project = work / f"rss-{kind}"
        configs[kind] = new_project(project, "sqlite:///unused.db")  # --tracking-uri decides
        log_run(configs[kind], tree, with_files=kind == "with", steps=steps)
    peaks: dict[str, list[float]] = {"with": [], "without": []}
    secs: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(repeat):
        for kind in ("with", "without") if i % 2 == 0 else ("without", "with"):
            project = configs[kind].parent.parent
            uri = sqlite_store(template, project / "data" / "mlflow" / f"rss-{i}.db")
            peak, s = peak_rss(configs[kind], uri)
            peaks[kind].append(peak)
            secs[kind].append(s)
            shutil.rmtree(project / "data" / "mlflow" / "artifacts", ignore_errors=True)
    ratios = [w / n for w, n in zip(peaks["with"], peaks["without"], strict=True)]
    print(f"\n== peak RSS of the ff-sync command ({steps * 20} metric points per spool) ==")
    for kind in ("with", "without"):
        values = ", ".join(f"{p:.1f}" for p in peaks[kind])
        print(
            f"{kind:>7} files: peak {values} MiB; pass {statistics.median(secs[kind]):.2f} s "
            "(median, whole command)"
        )
    verdict = "met" if statistics.median(ratios) <= RSS_TARGET else "MISSED"
    print(f"with / without: {spread(ratios)}; target <= {RSS_TARGET:.2f}: {verdict}")
    return {"with_mib": peaks["with"], "without_mib": peaks["without"], "ratios": ratios}


# -- 3. SIGKILL mid-upload ------------------------------------------------------------------


def crash(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    total = args.crash_mb * MIB
    small = 3000
    small_bytes_guess = small * (args.small_max_kib * 1024 + 1) // 2
    large = [(total - small_bytes_guess) // 6] * 6
    # Spread over the set: the upload goes in batches of up to 100 files in path order, and a
    # killed pass starts again at its batch, so a kill can land anywhere in the set, often
    # inside a large file.
    tree = make_tree(
        work / "crash-src" / "set", small, args.small_max_kib, large, args.seed + 7, spread=True
    )
    project = work / "crash"
    config = new_project(project, f"sqlite:///{project / 'data' / 'mlflow' / 'mlruns.db'}")
    print(f"\n== SIGKILL mid-upload: {tree.files} files, {tree.size / MIB:.0f} MiB ==")
    log_run(config, tree)
    artifacts = project / "data" / "mlflow" / "artifacts"
    env = {**clean_env(), "FF_CONFIG": str(config)}
    rng = random.Random(args.seed)
    kills = inside_file = 0
    ended_alone = False
    for _ in range(args.crash_kills):
        before = len(files_under(artifacts))
        proc = subprocess.Popen(
            [FF_SYNC, "-q", "--config", str(config)],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait until this pass writes into the destination, then kill it a moment later.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(files_under(artifacts)) > before:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, args.crash_max_delay))
        if proc.poll() is not None:
            ended_alone = True  # everything was uploaded before the kill
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        found = files_under(artifacts)
        inside_file += any(Path(p).name.startswith(TEMP_PREFIX) for p in found)
        uploaded = sum(not Path(p).name.startswith(TEMP_PREFIX) for p in found)
        print(f"kill {kills}: {uploaded} of {tree.files} files in the destination")
    final = subprocess.run(
        [FF_SYNC, "-q", "--config", str(config)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    (folder,) = artifacts.glob("*/*/artifacts")
    found = files_under(folder)
    leftovers = sorted(p for p in found if Path(p).name.startswith(TEMP_PREFIX))
    logged = {f"{tree.root.name}/{rel}": path for rel, path in files_under(tree.root).items()}
    same_paths = sorted(found) == sorted(logged)
    differ = [p for p in logged if p in found and not filecmp.cmp(logged[p], found[p], False)]
    verify = subprocess.run(
        [FF_SYNC, "--config", str(config), "verify"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    ok = final.returncode == 0 and same_paths and not differ and not leftovers
    ok = ok and verify.returncode == 0 and kills >= 2  # fewer: the check proved nothing
    print(
        f"kills: {kills} ({inside_file} left a temporary file behind them)"
        + ("; a pass then ended by itself" if ended_alone else "")
    )
    print(
        f"final pass exit {final.returncode}; paths identical: {same_paths}; files with other "
        f"bytes: {len(differ)}; temporaries left: {len(leftovers)}; verify exit "
        f"{verify.returncode}"
    )
    if final.returncode or verify.returncode:
        print(
            f"final pass: {final.stderr[-2000:]}\nverify: {(verify.stdout + verify.stderr)[-2000:]}"
        )
    if kills < 2:
        print("fewer than 2 kills landed mid-upload: lower --crash-max-delay")
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    shutil.rmtree(project)
    shutil.rmtree(tree.root.parent)
    return {"kills": kills, "inside_file": inside_file, "ok": ok}


# -- profile ---------------------------------------------------------------------------------


def profile_pass(work: Path, kind: str, tree: Tree, template: Path, server_uri: str | None) -> None:
    project = work / f"profile-{kind}"
    if kind == "sqlite":
        backend = sqlite_store(template, project / "data" / "mlflow" / "p.db")
    else:
        assert server_uri is not None
        backend = server_uri
    config = new_project(project, backend)
    log_run(config, tree)
    prof = cProfile.Profile()
    secs, _ = run_ff_sync(config, tree, prof)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(30)
    print(f"\n== cProfile of one ff-sync pass, {kind} destination ({secs:.2f} s) ==")
    print(buf.getvalue())
    shutil.rmtree(project)


# -- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(work: Path) -> Iterator[str]:
    sys.path.insert(0, str(REPO))
    from tests._services import MlflowServer

    srv = MlflowServer(work / "server")
    srv.start()
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=srv.uri).search_experiments()  # lazy setup, untimed
        yield srv.uri
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--small-max-kib", type=int, default=64)
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", action="store_true", help="also through an mlflow server")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS comparison")
    parser.add_argument(
        "--cold", action="store_true", help="empty the page cache before each side (root only)"
    )
    parser.add_argument("--rss-steps", type=int, default=500, help="metric steps (x20 keys)")
    parser.add_argument("--crash", action="store_true", help="the SIGKILL mid-upload check")
    parser.add_argument("--crash-mb", type=int, default=1024)
    parser.add_argument("--crash-kills", type=int, default=12)
    parser.add_argument("--crash-max-delay", type=float, default=0.2)
    parser.add_argument("--profile", action="store_true", help="cProfile one ff-sync pass")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global _COLD
    _COLD = args.cold
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it comes
    for name in [k for k in os.environ if k.startswith(("FF_", "MLFLOW_"))]:
        del os.environ[name]  # the in-process passes read only the projects' configs
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ff-bench-art-", dir=args.dir) as tmp:
        work = Path(tmp)
        tree = make_tree(
            work / "src" / "tree",
            args.small,
            args.small_max_kib,
            [args.large_mib * MIB] * args.large,
            args.seed,
        )
        template = migrated_template(work)
        kinds = ["sqlite", "http"] if args.server else ["sqlite"]
        with server(work) if args.server else contextlib.nullcontext() as uri:
            for kind in kinds:
                rounds = [
                    throughput_round(i, kind, work, tree, template, uri) for i in range(args.repeat)
                ]
                results[kind] = report_throughput(kind, tree, rounds)
                if args.profile:
                    profile_pass(work, kind, tree, template, uri)
        if not args.no_rss:
            results["rss"] = rss(work, tree, template, args.repeat, args.rss_steps)
        if args.crash:
            results["crash"] = crash(work, args)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if "crash" in results and not results["crash"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
