"""docs/spool-format.md agrees with the code: its example lines, checksum recipe, kinds, jq."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import orjson
import pytest

from formula_foundry.tracking import Tracker
from formula_foundry.tracking.events import KINDS, checksum_ok, frame

from ._helpers import read_clean

DOC = Path(__file__).resolve().parents[2] / "docs" / "spool-format.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_every_example_line_is_a_valid_framed_record(tmp_path: Path) -> None:
    lines = [line for block in blocks("jsonl") for line in block.splitlines()]
    inline = re.findall(r"^\{\"v\":1.*\}$", DOC.read_text(encoding="utf-8"), flags=re.M)
    # Nine example lines; the one in the framing section is one of them.
    assert len(lines) == 9 and set(inline) == set(lines)
    for line in lines:
        raw = line.encode()
        assert checksum_ok(raw), line
        record = orjson.loads(raw)
        assert record["k"] in KINDS
        assert frame({k: v for k, v in record.items() if k != "c"}) == raw + b"\n"
    # The example segment reads back clean.
    segment = tmp_path / "seg-1767225600001-node017-48213-a1b2c3.jsonl"
    segment.write_text(blocks("jsonl")[0], encoding="utf-8")
    events = read_clean(segment)
    assert [e.kind for e in events] == [
        "segment",
        "run_start",
        "tags",
        "params",
        "metrics",
        "metrics",
        "artifact_ref",
        "run_end",
    ]


def test_the_documented_checksum_recipe_is_the_readers() -> None:
    (recipe,) = [b for b in blocks("python") if "zlib.crc32" in b]
    line = frame({"v": 1, "s": 1, "t": 2, "k": "tags", "d": {"a": "x", "c": "y"}})
    json_bytes_of_record = orjson.dumps({"v": 1, "s": 1, "t": 2, "k": "tags", "d": {"a": "x"}})
    namespace = {"zlib": zlib, "json_bytes_of_record": json_bytes_of_record}
    exec(recipe, namespace)
    assert namespace["line"] == frame({"v": 1, "s": 1, "t": 2, "k": "tags", "d": {"a": "x"}})
    assert namespace["ok"] is True
    # The check part of the recipe agrees with checksum_ok, also on a line whose payload
    # contains the marker ,"c":" (a tag named c).
    assert b',"c":"y"' in line
    check = recipe[recipe.index("# checking") :]
    for candidate in (line, line.replace(b'"y"', b'"z"'), line.upper()):
        namespace = {"zlib": zlib, "line": candidate}
        exec(check, namespace)
        assert namespace["ok"] == checksum_ok(candidate[:-1]), candidate


def test_the_kinds_table_lists_every_kind() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## Event kinds", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert documented == set(KINDS)


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_the_jq_examples_run_on_a_real_spool(tracker: Tracker, ff_project: Path) -> None:
    with tracker.start_run(run_name="sim-001", experiment_name="ff-m2-simulation") as run:
        run.log_metric("val/loss", float("nan"), step=1)
        run.log_metric("val/loss", 0.5, step=2)
    (block,) = blocks("sh")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c and not c.startswith("#")]
    commands = [c.replace("3f2b9c0e8d6a4b1f9e7c5a3d1b0f8e6c", run.run_id) for c in commands]
    out = [
        subprocess.run(c, shell=True, cwd=ff_project, capture_output=True, text=True, check=True)
        for c in commands
    ]
    assert out[0].stdout == f"{run.run_id}\tff-m2-simulation\tsim-001\t-\n"
    points = [orjson.loads(x) for x in out[1].stdout.splitlines()]
    assert [(p["step"], p["value"]) for p in points] == [(1, "NaN"), (2, 0.5)]
    assert out[2].stdout.endswith("\tFINISHED\n") and run.run_id in out[2].stdout
    read_clean(next((ff_project / "data" / "runs" / run.run_id).glob("seg-*")))
