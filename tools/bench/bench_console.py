#!/usr/bin/env python3
"""Benchmark what console capture costs a process that prints as fast as it can.

Usage::

    python tools/bench/bench_console.py [--lines 100000] [--runs 7] [--to file] [--stderr same]
                                        [--pause SECONDS] [--dir DIR] [--json]

One child script, run in fresh interpreters: a tracker run whose block prints ``--lines``
lines of about 70 bytes with ``print`` as fast as it can. The child times from just before
``start_run`` to just after the run has ended — so the capture's start (pipes, ``dup2``, its
thread) and its end (flushing, handing the descriptors back, spooling the last chunk) are
inside the timed stretch — and writes the time to a side file, never to the output measured.

* ``off``: ``capture_output=False``; ``on``: ``capture_output=True``, as shipped;
* ``tee_only`` (for information): the capture with ``FF_CONSOLE_MAX_BYTES=0``: it tees every
  byte and spools none, so ``on`` minus ``tee_only`` is what spooling the output costs;
* ``on_framed`` (for information): the capture with its chunks framed as records by the
  writer's ``append_many`` (JSON of the whole record, the checksum's tail appended, the lines
  joined), as before ``append_split`` wrote each chunk's JSON where it lies;
* ``on_no_pause`` (for information): the capture with its reader pausing 0 s after each read,
  the design that wakes the reader for every write of the printer and takes the GIL from it
  each time (``tracking/console.py`` explains the pause);
* ``helper`` (for information): the other design, a helper process (a fresh interpreter) that
  does the tee and spools the same chunks with the same writer into a segment of its own,
  waited for before the run's end: no GIL shared, an interpreter started per run.

The six run in alternation, ``--runs`` rounds, so a burst of load on the machine hits all of
them; each round gives an on/off ratio; the median, lowest and highest are reported, and the
ratio of the best rounds, the whole-process wall time (interpreter start to exit) and the CPU
time of the timed stretch (all threads, and the helper process) of each for information: on a
machine busy with other work the CPU a variant adds costs wall time too, whichever core it
runs on.

``--to`` is where the child's stdout goes: ``file`` (a regular file, as a Slurm job's output;
the default), ``pipe`` (read by this process), ``pty`` (a pseudo-terminal read by this process:
an interactive terminal, line-buffered) or ``devnull``; ``--stderr`` whether stderr goes there
too (``same``, the default: a Slurm job without ``--error``, captured as one stream) or to a
file of its own (``apart``: two pipes). After each ``on`` child the script checks that its
output is byte-identical to the ``off`` child's and that the spool holds every byte of it.
``--pause`` tries another pause of the reader than the shipped one.

Target: ``on`` <= 1.10 x ``off`` (median).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_RATIO = 1.10
MODES = ("off", "on", "tee_only", "on_framed", "on_no_pause", "helper")
CONFIG_VARS = (
    "FF_CONFIG",
    "FF_SPOOL_ROOT",
    "FF_DURABILITY",
    "FF_TRACKING_DISABLED",
    "FF_SYSTEM_METRICS",
    "FF_CAPTURE_OUTPUT",
    "FF_CONSOLE_MAX_BYTES",
    "PYTHONUNBUFFERED",
    # An installed package has its bytecode cache: the warm-up run writes it.
    "PYTHONDONTWRITEBYTECODE",
)

# The alternative to the reader thread, for comparison: a helper process that tees the pipe
# to the original and spools it into a segment of its own, with the same chunking and writer.
_HELPER = """
import os, sys, time
from pathlib import Path
from formula_foundry.tracking.console_events import Chunker
from formula_foundry.tracking.spool_writer import SegmentWriter

read_fd, out_fd, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[5]
writer = SegmentWriter(Path(sys.argv[3]), sys.argv[4])
chunker = Chunker(1 << 40)
while data := os.read(read_fd, 1 << 20):  # no GIL to share: read as soon as there is data
    view = memoryview(data)
    while view:
        view = view[os.write(out_fd, view):]
    chunker.add(stream, data, time.time_ns() // 1_000_000)
    if chunker.largest() >= 65536:
        writer.append_many([r for r, _, _ in chunker.take(time.time_ns() // 1_000_000)])
items = chunker.take(time.time_ns() // 1_000_000, final=True)
if items:
    writer.append_many([r for r, _, _ in items])
writer.close()
"""

_CHILD = """
import fcntl, os, subprocess, sys, time
t0 = time.perf_counter()
from formula_foundry.tracking import get_tracker

lines, mode, out, pause, helper = sys.argv[1:6]
lines = int(lines)
if mode == "on_framed":
    import formula_foundry.tracking.console as console

    console.SegmentWriter = type("NotASegmentWriter", (), {})  # emit() takes append_many
if mode == "on_no_pause" or pause:
    import formula_foundry.tracking.console as console

    console.PAUSE_MS = 0 if mode == "on_no_pause" else round(float(pause) * 1000)


def start_helper(run):
    sys.stdout.flush()
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(read_fd, 1031, 1 << 20)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    st1, st2 = os.fstat(1), os.fstat(2)
    both = (st1.st_dev, st1.st_ino) == (st2.st_dev, st2.st_ino)
    stream = "stdout+stderr" if both else "stdout"
    root = str(get_tracker().settings.spool_root)
    proc = subprocess.Popen(
        [sys.executable, "-c", helper, str(read_fd), str(saved[1]), root, run.run_id, stream],
        pass_fds=(read_fd, saved[1]),
        stdin=subprocess.DEVNULL,
    )
    os.close(read_fd)
    for fd in (1, 2) if both else (1,):
        os.dup2(write_fd, fd)
    os.close(write_fd)

    def stop():
        sys.stdout.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        proc.wait()  # its last chunk is spooled before the run's end

    return stop


import resource


def cpu():
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


c1 = cpu()
t1 = time.perf_counter()
capture = mode in ("on", "tee_only", "on_framed", "on_no_pause")
with get_tracker().start_run(run_name="bench-console", capture_output=capture) as run:
    stop = start_helper(run) if mode == "helper" else None
    for i in range(lines):
        print(f"step {i:7d} loss={1.0 / (i + 1):.6f} lr=0.001 some more text of a log line")
    if stop is not None:
        stop()
t2 = time.perf_counter()
c2 = cpu()
with open(out, "w") as fh:
    fh.write(f"{t2 - t1} {t1 - t0} {run.run_id} {c2 - c1}")
"""


def _spooled_stdout(spool: Path, run_id: str) -> bytes:
    """The stdout bytes the run's console events hold."""
    out = bytearray()
    for seg in sorted((spool / run_id).glob("seg-*.jsonl")):
        for line in seg.read_bytes().splitlines():
            rec = json.loads(line)
            # The child writes nothing to stderr: its stdout is the stdout+stderr stream where
            # the two went to one place.
            if rec["k"] == "console" and rec["stream"] in ("stdout", "stdout+stderr"):
                if "text" in rec:
                    out += rec["text"].encode("utf-8")
                elif "b64" in rec:
                    out += base64.b64decode(rec["b64"])
    return bytes(out)


def _drain(fd: int, sink: bytearray) -> None:
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:  # a pseudo-terminal whose child side closed
            return
        if not data:
            return
        sink += data


def run_child(
    folder: Path, lines: int, mode: str, to: str, stderr: str, pause: str = ""
) -> tuple[float, float, bytes, str, float]:
    """(timed seconds, whole-process seconds, the child's stdout, run id, CPU seconds)."""
    result = folder / f"result-{mode}.txt"
    argv = [sys.executable, "-c", _CHILD, str(lines), mode, str(result), pause, _HELPER]
    got = bytearray()
    # tee_only: the capture with a cap of 0 bytes, which tees and spools nothing.
    env = dict(os.environ, FF_CONSOLE_MAX_BYTES="0") if mode == "tee_only" else None
    with open(folder / "stderr.txt", "wb") as err_file:
        same = stderr == "same"
        started = time.perf_counter()
        if to == "file":
            target = folder / f"out-{mode}.txt"
            with open(target, "wb") as fh:
                subprocess.run(
                    argv, stdout=fh, stderr=fh if same else err_file, env=env, check=True
                )
            got += target.read_bytes()
        elif to in ("devnull", "pipe"):
            out = subprocess.DEVNULL if to == "devnull" else subprocess.PIPE
            err = subprocess.STDOUT if same else err_file
            got += subprocess.run(argv, stdout=out, stderr=err, env=env, check=True).stdout or b""
        else:  # pty
            master, slave = pty.openpty()
            reader = threading.Thread(target=_drain, args=(master, got))
            reader.start()
            proc = subprocess.Popen(argv, stdout=slave, stderr=slave if same else err_file, env=env)
            os.close(slave)
            proc.wait()
            reader.join()
            os.close(master)
            if proc.returncode:
                raise SystemExit(f"child {mode} failed: exit {proc.returncode}")
        whole = time.perf_counter() - started
    timed, _startup, run_id, cpu = result.read_text().split()
    return float(timed), whole, bytes(got), run_id, float(cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7, help="rounds of the six, in turn")
    parser.add_argument("--to", choices=("file", "pipe", "pty", "devnull"), default="file")
    parser.add_argument(
        "--stderr",
        choices=("same", "apart"),
        default="same",
        help="stderr where stdout goes (a Slurm job without --error), or to a file of its own",
    )
    parser.add_argument(
        "--pause",
        default="",
        metavar="SECONDS",
        help="the reader's pause after a read in 'on' (default: console.PAUSE_S, as shipped)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    timed: dict[str, list[float]] = {m: [] for m in MODES}
    whole: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ff-bench-console-", dir=args.dir) as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # no config/mlflow.yaml here: defaults, the spool under ./data/runs
        for name in CONFIG_VARS:
            os.environ.pop(name, None)
        spool = folder / "data" / "runs"
        run_child(
            folder, 1000, "on", args.to, args.stderr
        )  # warm-up: bytecode caches, the page cache
        for _ in range(args.runs):
            outputs: dict[str, bytes] = {}
            for mode in MODES:
                seconds, wall, output, run_id, cpu_s = run_child(
                    folder, args.lines, mode, args.to, args.stderr, args.pause
                )
                timed[mode].append(seconds)
                whole[mode].append(wall)
                cpu[mode].append(cpu_s)
                outputs[mode] = output
                if mode != "off" and args.to != "devnull":
                    spooled = None if mode == "tee_only" else _spooled_stdout(spool, run_id)
                    check(outputs["off"], output, spooled, mode, args.to)

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.lines} lines printed "
        f"to a {args.to} (stderr: {args.stderr}), {args.runs} rounds ({', '.join(MODES)} in "
        "turn)"
    )
    fig: dict[str, object] = {"timed_s": timed, "process_s": whole, "cpu_s": cpu}
    for mode in MODES:
        print(
            f"{mode:<12} run {statistics.median(timed[mode]) * 1000:7.1f} ms "
            f"(rounds {', '.join(f'{t * 1000:.0f}' for t in timed[mode])}); "
            f"whole process {statistics.median(whole[mode]) * 1000:7.1f} ms; "
            f"CPU {statistics.median(cpu[mode]) * 1000:6.1f} ms"
        )
    for mode in MODES[1:]:
        ratios = [a / b for a, b in zip(timed[mode], timed["off"], strict=True)]
        walls = [a / b for a, b in zip(whole[mode], whole["off"], strict=True)]
        cpus = [a / b for a, b in zip(cpu[mode], cpu["off"], strict=True)]
        med = statistics.median(ratios)
        best = min(timed[mode]) / min(timed["off"])
        fig[f"ratio_{mode}"] = ratios
        fig[f"best_ratio_{mode}"] = best
        verdict = "ok" if med <= TARGET_RATIO else "MISSED"
        target = f"   [<= {TARGET_RATIO} x: {verdict}]" if mode == "on" else ""
        print(
            f"{mode} / off: {med:.3f} x (rounds {min(ratios):.3f}-{max(ratios):.3f}; best / "
            f"best {best:.3f} x); whole process {statistics.median(walls):.3f} x; CPU "
            f"{statistics.median(cpus):.3f} x{target}"
        )
    if args.json:
        print(json.dumps(fig))
    return 0


def check(off: bytes, on: bytes, spooled: bytes | None, mode: str, to: str) -> None:
    """The capture changed nothing of what the destination got, and spooled all of it."""
    if on != off:
        raise SystemExit(f"{mode}: the {to} got {len(on)} bytes, not the {len(off)} of off")
    if spooled is None:
        return
    expected = off.replace(b"\r\n", b"\n") if to == "pty" else off  # the terminal's ONLCR
    if spooled != expected:
        raise SystemExit(f"{mode}: the spool holds {len(spooled)} bytes of {len(expected)}")


if __name__ == "__main__":
    sys.exit(main())
