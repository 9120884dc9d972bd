"""SIGKILL at random points: every log call that returned is read back, nothing wrong ever is."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ._helpers import child_env, only_segment, payloads, read

# Logs forever; after each call returns, writes the number of returned calls to the pipe.
CHILD = textwrap.dedent(
    """
    import os, sys
    from formula_foundry.tracking import get_tracker

    fd = int(sys.argv[1])
    run = get_tracker().start_run(run_name="crash")
    os.write(fd, run.run_id.encode() + b"\\n")
    i = 0
    while True:
        k = i % 4
        if k == 0:
            run.log_metric("m", i * 0.5, step=i)
        elif k == 1:
            run.log_metrics({"a": float(i), "b": -float(i)}, step=i)
        elif k == 2:
            run.set_tag("t", "v%d" % i)
        else:
            run.log_param("p%d" % i, i)
        i += 1
        os.write(fd, b"%d\\n" % i)
    """
)


def expected(i: int) -> dict[str, Any]:
    """The payload of call ``i`` of CHILD."""
    k = i % 4
    if k == 0:
        return {"k": "metrics", "step": i, "d": {"m": i * 0.5}}
    if k == 1:
        return {"k": "metrics", "step": i, "d": {"a": float(i), "b": -float(i)}}
    if k == 2:
        return {"k": "tags", "d": {"t": f"v{i}"}}
    return {"k": "params", "d": {f"p{i}": str(i)}}


def kill_at_random(project: Path, seed: int, durability: str) -> tuple[str, int]:
    """Start CHILD, SIGKILL it after a random delay; return its run id and returned calls."""
    rng = random.Random(seed)
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(w)],
        cwd=project,
        env=child_env(FF_DURABILITY=durability),
        pass_fds=(w,),
        stderr=subprocess.PIPE,
    )
    os.close(w)
    received = b""
    try:
        # Wait for the run to start, then kill after a random delay, draining the pipe.
        while b"\n" not in received:
            ready, _, _ = select.select([r], [], [], 30)
            assert ready, "the child did not start a run"
            chunk = os.read(r, 65536)
            assert chunk, proc.stderr.read().decode() if proc.stderr else "child died"
            received += chunk
        deadline = time.monotonic() + rng.uniform(0.0, 0.25)
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                received += os.read(r, 65536)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        while chunk := os.read(r, 65536):
            received += chunk
    finally:
        os.close(r)
        if proc.poll() is None:  # pragma: no cover - only if an assertion fired above
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    lines = received.split(b"\n")
    counts = [int(x) for x in lines[1:-1]]  # the last element is "" or a cut-off number
    return lines[0].decode(), counts[-1] if counts else 0


@pytest.mark.parametrize(
    ("seed", "durability"),
    [*((seed, "write") for seed in range(8)), (100, "fsync"), (101, "fsync")],
)
def test_sigkill_keeps_every_returned_call(ff_project: Path, seed: int, durability: str) -> None:
    run_id, returned = kill_at_random(ff_project, seed, durability)
    path = only_segment(ff_project / "data" / "runs", run_id)
    events, problems, reader = read(path)
    assert problems == [], [p.describe() for p in problems]
    assert reader.tail in ("clean", "unfinished")
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events[:2]] == ["segment", "run_start"]
    logged = payloads(events[2:])
    # Every returned call is there, in order; at most the one in flight follows.
    assert returned <= len(logged) <= returned + 1, (returned, len(logged))
    assert logged == [expected(i) for i in range(len(logged))]
