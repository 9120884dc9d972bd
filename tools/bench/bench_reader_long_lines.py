#!/usr/bin/env python3
"""Time and peak memory of the spool reader: normal lines, and lines without an end.

Usage::

    python tools/bench/bench_reader_long_lines.py [--lines 1000000] [--sizes 50,100,200]
                                                  [--repeat 3] [--dir DIR] [--skip-long]

(a) normal path: a segment of ``--lines`` one-point metric events (what ``log_metric``
    writes), read whole by ``SegmentReader``; best of ``--repeat``, in lines per CPU second
    (the machine may be shared).
(b) long lines: for each size in MB, a segment holding, after a few valid events,
    ``nul``: a NUL run of that size, then a valid record on the same line;
    ``garbage``: that many bytes without a newline, then ``\\n`` and a valid record;
    ``tail``: that many bytes without a newline at the end of the file (an unfinished tail).
    Each is read by a fresh process; its wall time and peak RSS (``VmHWM``, Linux) are
    printed. Reading must be linear in bytes (the time per MB stays flat as the size grows)
    and bounded in memory (the RSS does not grow with the size).

To compare with another version of the reader, run it with ``PYTHONPATH`` pointing at that
version's ``src``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from formula_foundry.tracking.events import frame, frame_metric

MB = 1_000_000
T0 = 1_767_225_600_000

# The child reports its own peak (VmHWM): ru_maxrss would also count the parent's memory at
# the fork before exec, which Linux keeps across execve.
_READ = """
import sys, time
from pathlib import Path
from formula_foundry.tracking.spool_reader import Event, SegmentReader
start = time.perf_counter()
reader = SegmentReader(Path(sys.argv[1]))
kinds = [type(i).__name__ if isinstance(i, Event) else i.kind for i in reader]
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:
    peak_kb = next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
print(seconds, peak_kb, reader.tail, ",".join(kinds[2:]))
"""


def header(run: str = "bench") -> bytes:
    rec = {"v": 1, "s": 0, "t": T0, "k": "segment", "format": 1, "run": run, "pid": 1}
    return frame(rec | {"host": "h", "segment": "seg.jsonl"})


def metric_line(seq: int) -> bytes:
    return frame_metric(seq, T0 + seq, seq, b'"train/loss"', b"%r" % (seq / 7))


def write_normal(path: Path, lines: int) -> None:
    with open(path, "wb") as fh:
        fh.write(header())
        block: list[bytes] = []
        for seq in range(1, lines + 1):
            block.append(metric_line(seq))
            if len(block) == 10_000:
                fh.write(b"".join(block))
                block.clear()
        fh.write(b"".join(block))


def write_long(path: Path, case: str, size: int) -> None:
    filler = b"\x00" if case == "nul" else b"x"
    with open(path, "wb") as fh:
        fh.write(header() + metric_line(1))
        piece = filler * (1 << 20)
        left = size
        while left > 0:
            fh.write(piece[: min(left, len(piece))])
            left -= len(piece)
        if case == "nul":
            fh.write(metric_line(2))
        elif case == "garbage":
            fh.write(b"\n" + metric_line(2))


def read_normal(path: Path, repeat: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of reading ``path`` whole."""
    from formula_foundry.tracking.spool_reader import SegmentReader

    wall = cpu = float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        n = sum(1 for _ in SegmentReader(path))
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    assert n > 0
    return wall, cpu


def read_in_child(path: Path) -> tuple[float, float, str]:
    """Wall seconds of the read, peak RSS in MB, and what was read."""
    out = subprocess.run(
        [sys.executable, "-c", _READ, str(path)], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    seconds, peak_kb, tail, kinds = out.split(" ", 3)
    return float(seconds), int(peak_kb) / 1024, f"tail={tail} items={kinds.strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sizes", default="50,100,200", help="long-line sizes in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "normal.jsonl"
        write_normal(path, args.lines)
        wall, cpu = read_normal(path, args.repeat)
        size = path.stat().st_size / MB
        print(
            f"normal: {args.lines} metric lines ({size:.0f} MB) in {wall:.3f} s "
            f"({cpu:.3f} s CPU): {args.lines / cpu / 1e6:.2f} M lines per CPU second"
        )
        path.unlink()
        if args.skip_long:
            return
        for case in ("nul", "garbage", "tail"):
            for mb in (int(s) for s in args.sizes.split(",")):
                path = Path(tmp) / f"{case}-{mb}.jsonl"
                write_long(path, case, mb * MB)
                seconds, rss, what = read_in_child(path)
                print(
                    f"{case:8s} {mb:4d} MB: {seconds:7.3f} s ({seconds / mb * 1000:6.2f} ms/MB), "
                    f"peak RSS {rss:6.0f} MB; {what}"
                )
                path.unlink()


if __name__ == "__main__":
    main()
