"""Where a resumed run's system metrics continue: the step after the last one spooled.

MLflow's monitor, resuming a run, starts at the greatest ``system/`` step the run has plus one,
so a requeued job's samples follow its earlier ones instead of starting again at 0 on top of
them. Ours do the same from the spool: one scan of the run's segments, in the sampler's thread
before its first sample — never in ``start_run`` nor on the ``log_*`` path. Lines are found by
``bytes.find`` and only those holding a key of the prefix are parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import orjson

from formula_foundry.tracking.events import K_METRICS, checksum_ok
from formula_foundry.tracking.spool_writer import is_segment_name

_CHUNK: Final = 1 << 20
# Longer lines are skipped (a system-metrics event is a few hundred bytes); bounds memory
# whatever a damaged segment holds.
_MAX_SCANNED_LINE: Final = 1 << 20
# The envelope ``{"v":1,"s":<seq>,"t":<ms>,"k":"metrics"`` fits well within this many bytes.
_KIND_WINDOW: Final = 96
_METRICS_MARK: Final = b'"k":"%s"' % K_METRICS.encode()


def next_step(spool_root: Path, run_id: str, prefix: str) -> int:
    """One more than the greatest step of a metric named ``<prefix><name>`` (no further
    ``/``) in the run's segments; 0 when there is none. Unreadable segments are skipped."""
    mark = orjson.dumps(prefix)[:-1]  # the key's opening quote and the prefix
    greatest = -1
    try:
        paths = [p for p in (spool_root / run_id).iterdir() if is_segment_name(p.name)]
    except OSError:
        return 0
    for path in paths:
        try:
            with open(path, "rb") as fh:
                greatest = max(greatest, _scan(fh, mark, prefix))
        except OSError:
            continue
    return greatest + 1


def _scan(fh: Any, mark: bytes, prefix: str) -> int:
    greatest = -1
    pending = b""
    while chunk := fh.read(_CHUNK):
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n") + 1  # data[:cut] is whole lines
        pos = data.find(mark, 0, cut)
        while pos >= 0:
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            if 0 <= data.find(_METRICS_MARK, start, start + _KIND_WINDOW) < pos:
                greatest = max(greatest, _step_of(data[start:end], prefix))
            pos = data.find(mark, end, cut)
        pending = data[cut:]
        if len(pending) > _MAX_SCANNED_LINE:
            pending = b""  # a damaged stretch without newlines: its tail fails the checksum
    return greatest


def _step_of(line: bytes, prefix: str) -> int:
    if not checksum_ok(line):
        return -1
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return -1
    if not isinstance(rec, dict) or not isinstance(rec.get("d"), dict):
        return -1
    step = rec.get("step")
    if type(step) is not int:
        return -1
    n = len(prefix)
    ours = any(k.startswith(prefix) and "/" not in k[n:] for k in rec["d"])
    return step if ours else -1
