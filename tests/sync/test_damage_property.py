"""Property: random damage to valid spools never stops the queue and never hides a record.

Valid spools are written once by the real tracker; each example copies them and damages some
runs at random: bit flips, truncation, NUL runs, duplicated and swapped lines, fields out of
range under a valid checksum, unreadable files and folders, a segment copied from another run.
The real ``ff-sync`` then runs with the permission checks a normal user has (root's
``CAP_DAC_OVERRIDE`` dropped, so mode 000 means unreadable here too). Whatever the damage:

* a pass exits 0 or 1: never 70 (a crash), never 75 (damage is not an outage);
* a second pass reports nothing new twice: each quarantined ``(file, offset)`` appears once;
* every undamaged run verifies exactly (``ff-sync verify --json``);
* each damaged record whose line we know is reported in the quarantine, with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from formula_foundry.tracking.events import CHECKSUM_TAIL
from tests.sync.conftest import FF_SYNC, Project

BASE_SPOOL = """
import math
ids = []
for i in range(4):
    with tracker.start_run(run_name=f"r{i}", experiment_name="damage") as run:
        run.log_params({"lr": 0.1 * (i + 1), "opt": "adam"})
        for s in range(12):
            run.log_metric("loss", 1.0 / (s + 1), step=s)
        run.log_metrics({"a": 1.5, "b": math.nan}, step=3)
        run.set_tag("phase", "one")
        run.log_artifact_reference("out/f.bin", "sha256:" + "ab" * 32, 10)
        worker = tracker.attach_run(run.run_id)
        worker.log_metric("rank1", 2.0, step=1)
        worker.set_tag("rank", "1")
        worker.end()
        if i == 1:
            with tracker.start_run(run_name="child", nested=True) as child:
                child.log_metric("m", 2.0)
                ids.append(child.run_id)
        run.set_tag("phase", "two")
        ids.append(run.run_id)
print(" ".join(ids))
"""

# Drop root's permission bypass, so a mode-000 file is unreadable to the sync as to a user.
_AS_USER = (
    ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if os.geteuid() == 0 and shutil.which("setpriv")
    else []
)
_FIELD_DAMAGE = [
    ("t", 2**64),
    ("t", -5),
    ("s", 2**63),
    ("step", 2**70),
    ("step", 1.5),
    ("step", "3"),
    ("size", 2**64),
    ("status", 7),
    ("d", {"x": {"nested": 1}}),
    ("d", ["not", "a", "mapping"]),
    ("name", ["x"]),
    ("path", 12),
]
_CAN_LOCK = bool(_AS_USER) or os.geteuid() != 0  # can a mode-000 file stop the sync?
OPS = (
    "flip",
    "header",
    "truncate",
    "nul_run",
    "duplicate",
    "swap",
    "field",
    "foreign",
) + (("unreadable_file", "unreadable_dir") if _CAN_LOCK else ())


@dataclass
class Damage:
    """What was done to the copy, and which lines must show up in the quarantine."""

    runs: set[str] = field(default_factory=set)
    # (segment, damaged line's bytes): each must be reported where it ends up in the file
    reported: list[tuple[Path, bytes]] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    # Segments copied in from another run or with a damaged header: quarantined whole (at
    # their header), so their other lines are not reported one by one.
    whole: set[Path] = field(default_factory=set)
    # The lines each segment had before any damage: a line damaged back into one of them (the
    # same bit flipped twice) is no damage.
    original: dict[Path, set[bytes]] = field(default_factory=dict)

    def reported_ranges(self) -> Iterator[tuple[Path, int, int]]:
        """Where each damaged line is in the final file (lines moved, cut or lost skipped)."""
        for seg, line in self.reported:
            if line in self.original.get(seg, ()):
                continue
            data = seg.read_bytes() if seg.exists() else b""
            at = data.find(line)
            while at > 0 and data[at - 1 : at] != b"\n":
                at = data.find(line, at + 1)
            if at >= 0:
                yield seg, at, at + len(line)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    proj = Project(tmp_path_factory.mktemp("damage-base") / "project")
    proj.configure()
    ids = proj.spool(BASE_SPOOL).split()
    yield proj.spool_root, ids


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _segments(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name.startswith("seg-"))


def _damage(root: Path, ids: list[str], plan: list[tuple[int, str, int, int]]) -> Damage:
    """Apply ``plan``: (run index, op, a, b), where a and b pick lines, bytes or fields."""
    done = Damage()
    for run_index, op, a, b in plan:
        run = ids[run_index % len(ids)]
        run_dir = root / run
        segs = _segments(run_dir)
        seg = segs[a % len(segs)]
        lines = _lines(seg)
        done.original.setdefault(seg, set(lines))
        body = len(lines) - 1  # line 0 is the header
        done.runs.add(run)
        if op == "unreadable_dir":
            done.unreadable.append(run_dir)
            continue
        if op == "unreadable_file":
            done.unreadable.append(seg)
            continue
        if op == "foreign":
            donor = root / ids[(run_index + 1) % len(ids)]
            src = _segments(donor)[0]
            copy = run_dir / src.name.replace("seg-", "seg-9", 1)
            shutil.copyfile(src, copy)
            done.whole.add(copy)
            done.reported.append((copy, _lines(copy)[0]))  # its header names another run
            continue
        i = 0 if op == "header" else 1 + b % body if body >= 1 else -1
        if i < 0 or not lines[i].endswith(b"\n"):
            continue
        line = lines[i]
        if op == "header":
            done.whole.add(seg)
        if op in ("flip", "header"):
            flipped = bytearray(line)
            pos = a % (len(line) - 1)  # not the newline: a split line is another case
            flipped[pos] ^= 1 << (b % 8)
            line = bytes(flipped)
            if b"\n" not in line[:-1]:
                done.reported.append((seg, line))
        elif op == "truncate":
            cut = sum(map(len, lines[:i])) + a % len(line)
            seg.write_bytes(b"".join(lines)[:cut])
            continue
        elif op == "nul_run":
            line = b"\x00" * (1 + a % 5000) + line[a % len(line) :]
            done.reported.append((seg, line))
        elif op == "duplicate":
            lines.insert(i, line)
        elif op == "swap" and body >= 2:
            j = 1 + (i % body)
            lines[i], lines[j] = lines[j], lines[i]
            line = lines[i]
        elif op == "field":
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # damaged before
            rec.pop("c", None)
            key, value = _FIELD_DAMAGE[a % len(_FIELD_DAMAGE)]
            if key not in rec:
                key, value = ("t", 2**64) if a % 2 else ("s", -1)
            rec[key] = value
            line = _frame(rec)
            done.reported.append((seg, line))
        lines[i] = line
        seg.write_bytes(b"".join(lines))
    return done


def _frame(record: dict[str, Any]) -> bytes:
    """A line with a valid checksum, for values orjson will not write (ints beyond 64 bits)."""
    head = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()[:-1]
    return CHECKSUM_TAIL % (head, zlib.crc32(head))


def _run(proj: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_AS_USER, FF_SYNC, "--config", str(proj.config), *args],
        cwd=proj.root,
        env=proj.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _quarantine(proj: Project) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in proj.state_dir.glob("*/quarantine.jsonl"):
        out += [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return out


plans = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from(OPS),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=int(os.environ.get("FF_DAMAGE_EXAMPLES", "10")),
    deadline=None,
    # Each example runs ff-sync three times: shrinking a failure would take many minutes, and
    # the falsifying plan is small enough to read as it is.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans)
def test_damage_never_blocks_or_hides(base: tuple[Path, list[str]], plan: Any) -> None:
    spool, ids = base
    # Plans damage the four top-level runs; the child (ids[1]) is never damaged itself, but
    # waits for its parent (ids[2]) when that cannot be created.
    top = [ids[0], ids[2], ids[3], ids[4]]
    work = Path(tempfile.mkdtemp(prefix="ff-damage-"))
    try:
        proj = Project(work / "project")
        proj.configure(retries=0, backoff=0.01)
        shutil.copytree(spool, proj.spool_root)
        done = _damage(proj.spool_root, top, plan)
        for path in done.unreadable:
            path.chmod(0)

        first = _run(proj)
        assert first.returncode in (0, 1), first.stderr
        second = _run(proj)
        assert second.returncode in (0, 1), second.stderr
        assert "Traceback" not in first.stderr + second.stderr

        records = _quarantine(proj)
        keys = [(r["file"], r["offset"]) for r in records]
        assert len(keys) == len(set(keys)), "a record was reported twice"
        assert all(r.get("reason") for r in records)
        for seg, begin, end in done.reported_ranges():
            if seg in done.whole and begin > 0:
                continue  # the segment is quarantined whole, reported once at its header
            if any(seg.parent in (p, p.parent) for p in done.unreadable):
                # A run with an unreadable part may wait for it (its run_start may be there):
                # its records are checked, and reported, once the part is readable again.
                continue
            assert any(r["file"] == str(seg) and begin <= r["offset"] < end for r in records), (
                f"damage in {seg} bytes {begin}-{end} was not reported: {records}"
            )

        checked = _run(proj, "verify", "--json")
        assert checked.returncode in (0, 1), checked.stderr
        report = orjson.loads(checked.stdout)
        differing = {d["run"] for d in report["differences"]}
        if ids[2] in done.runs:
            done.runs.add(ids[1])
        undamaged = set(ids) - done.runs
        assert not differing & undamaged, report["differences"]
        if done.unreadable:
            named = first.stdout + first.stderr
            for path in done.unreadable:
                if any(p in path.parents for p in done.unreadable):
                    continue  # inside an unreadable folder: that folder is what is named
                assert str(path) in named and "permission denied" in named.lower(), named
    finally:
        for path in work.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(work, ignore_errors=True)
