"""Correctness at the edges of the tracker (issue 11): reserved tags, nested experiments,
FF_RUN_ID, artifact reference layout, names, undecodable text, full disks, symlinks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.errors import (
    SpoolWriteError,
    ValidationError,
)
from formula_foundry.substrate import ArtifactStore
from formula_foundry.substrate.errors import InvalidLogicalPath
from formula_foundry.substrate.logical_path import validate_logical_path
from formula_foundry.tracking import Tracker, get_tracker
from formula_foundry.tracking.resume import read_logged
from formula_foundry.tracking.spool_writer import SegmentWriter

from ._helpers import child_env, payloads, read, read_clean, run_python, segments

DIGEST = "sha256:" + "ab" * 32


def run_events(spool_root: Path, run_id: str) -> list[Any]:
    return [e for seg in segments(spool_root, run_id) for e in read_clean(seg)]


def no_segments(spool_root: Path) -> bool:
    return not spool_root.exists() or list(spool_root.glob("*/seg-*")) == []


# --- 2: tags the sync owns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["ff.run_uuid", "ff.anything", "mlflow.parentRunId", "mlflow.user", "mlflow.source.name"],
)
def test_tags_the_sync_owns_are_refused_at_log_time(
    tracker: Tracker, spool_root: Path, key: str
) -> None:
    with tracker.start_run() as run:
        # The same name is a fine metric or param: only tags are reserved (the key cache is
        # shared, so logging these first must not let the tag through).
        run.log_metric(key, 1.0)
        run.log_params({key: "x"})
        for call in (
            lambda: run.set_tag(key, "0" * 32),
            lambda: run.set_tags({"fine": "1", key: "0" * 32}),
        ):
            with pytest.raises(ValidationError) as e:
                call()
            assert str(e.value).startswith(f"run {run.run_id}: tag {key!r} is reserved")
    assert "tags" not in [e.kind for e in run_events(spool_root, run.run_id)]


def test_start_run_refuses_reserved_tags_before_writing(tracker: Tracker, spool_root: Path) -> None:
    with pytest.raises(ValidationError, match=r"^run \w+: tag 'ff\.run_uuid' is reserved"):
        tracker.start_run(tags={"ff.run_uuid": "0" * 32})
    assert no_segments(spool_root) and tracker.active_run() is None
    # The description is the one mlflow.* tag a user sets, through its own argument.
    with tracker.start_run(description="notes", tags={"mlflow.note.content": "x"}) as run:
        run.set_tag("mlflow.runName", "renamed")
    tags = payloads(run_events(spool_root, run.run_id), "tags")
    assert tags[0]["d"] == {"mlflow.note.content": "x"}


# --- 4: nested runs go to their parent's experiment ---------------------------------------------


def test_a_child_defaults_to_its_parents_experiment(tracker: Tracker, spool_root: Path) -> None:
    with (
        tracker.start_run(experiment_name="exp-a") as parent,
        tracker.start_run(nested=True) as child,
        tracker.start_run(nested=True, experiment_name="exp-b") as other,
        tracker.start_run(nested=True) as grandchild,
    ):
        pass
    got = {
        r.run_id: run_events(spool_root, r.run_id)[1].data["experiment"]
        for r in (parent, child, other, grandchild)
    }
    assert got == {
        parent.run_id: "exp-a",
        child.run_id: "exp-a",
        other.run_id: "exp-b",
        grandchild.run_id: "exp-b",
    }
    assert child.experiment_name == "exp-a"
    with tracker.start_run() as top:  # a top-level run still uses the configured default
        pass
    assert top.experiment_name == tracker.settings.default_experiment


# --- 5: FF_RUN_ID names one run ------------------------------------------------------------------

SWEEP = """
    import json, os
    from formula_foundry.errors import RunStateError, ValidationError
    from formula_foundry.tracking import get_tracker
    tracker = get_tracker()
    out = {}
    try:  # a failed start does not use up FF_RUN_ID
        tracker.start_run(experiment_name="elsewhere")
    except ValidationError as exc:
        out["failed"] = str(exc)
    for lr in (0.1, 0.2):
        try:
            with tracker.start_run(run_name=f"lr={lr}", experiment_name="sweep") as run:
                run.log_param("lr", lr)
                with tracker.start_run(nested=True) as child:  # children are not top-level
                    child.log_param("lr", lr)
            out.setdefault("runs", []).append(run.run_id)
        except RunStateError as exc:
            out["error"] = str(exc)
    # The sweep done right: an explicit run id per point.
    for lr in (0.1, 0.2):
        with tracker.start_run(run_id=f"point-{lr}") as run:
            run.log_param("lr", lr)
    print(json.dumps(out))
"""


def test_ff_run_id_names_one_run_a_second_top_level_run_is_an_error(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    # The job was started before in experiment "sweep".
    first = run_python(
        "from formula_foundry.tracking import get_tracker\n"
        "with get_tracker().start_run(experiment_name='sweep'): pass\n",
        cwd=ff_project,
        env=child_env(FF_RUN_ID="job-7"),
    )
    assert first.returncode == 0
    out = json.loads(run_python(SWEEP, cwd=ff_project, env=child_env(FF_RUN_ID="job-7")).stdout)
    assert "belongs to experiment 'sweep'" in out["failed"]
    assert out["runs"] == ["job-7"]
    assert out["error"] == (
        "FF_RUN_ID=job-7 names one run, and this process (or the one it was forked from) "
        "already started it; a second top-level run would merge into it. For a sweep, give "
        "each run its own id (tracker: run_id= in start_run) or unset FF_RUN_ID; a worker logs "
        "into the run with attach_run(os.environ['FF_RUN_ID'])"
    )
    params = [p["d"] for p in payloads(run_events(spool, "job-7"), "params")]
    assert params == [{"lr": "0.1"}]  # the second point never reached the run
    for lr in ("0.1", "0.2"):
        assert [p["d"] for p in payloads(run_events(spool, f"point-{lr}"), "params")] == [
            {"lr": lr}
        ]


FORK = """
    import json, os
    from formula_foundry.errors import RunStateError
    from formula_foundry.tracking import get_tracker
    tracker = get_tracker()
    run = tracker.start_run()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = {}
        try:
            tracker.start_run()
        except RunStateError as exc:
            out["error"] = str(exc)
        with tracker.attach_run(os.environ["FF_RUN_ID"]) as worker:
            worker.log_metric("from_worker", 1.0)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    print(os.read(r, 65536).decode())
    run.end()
"""


def test_a_forked_child_does_not_take_ff_run_id_again(ff_project: Path) -> None:
    out = json.loads(run_python(FORK, cwd=ff_project, env=child_env(FF_RUN_ID="job-8")).stdout)
    assert out["error"].startswith("FF_RUN_ID=job-8 names one run")
    events = run_events(ff_project / "data" / "runs", "job-8")
    assert [e.data["resume"] for e in events if e.kind == "run_start"] == [False]
    assert [e.data["status"] for e in events if e.kind == "run_end"] == ["FINISHED"]
    assert {"from_worker": 1.0} in [e.data["d"] for e in events if e.kind == "metrics"]


RESUME = """
    import json, os, sys
    from formula_foundry.errors import ParamConflictError
    from formula_foundry.tracking import get_tracker
    tracker = get_tracker()
    out = {}
    run = tracker.attach_run("job-9") if sys.argv[1] == "attach" else tracker.start_run()
    with run:
        run.log_param("seed", 1)  # the same value: fine, writes nothing
        try:
            run.log_params({"new": "x", "lr": sys.argv[2]})
        except ParamConflictError as exc:
            out["error"] = str(exc)
        run.log_param("new", "y")
    print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["resume", "attach"])
def test_a_resumed_run_refuses_a_changed_param_at_log_time(ff_project: Path, how: str) -> None:
    spool = ff_project / "data" / "runs"
    env = child_env(FF_RUN_ID="job-9")
    code = """
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run() as run:
            run.log_params({"lr": "0.1", "seed": 1})
    """
    run_python(code, cwd=ff_project, env=env)
    # A damaged line (its checksum fails) is not something the run logged.
    (segment,) = segments(spool, "job-9")
    with segment.open("ab") as fh:
        fh.write(b'{"v":1,"s":9,"t":1,"k":"params","d":{"new":"q"},"c":"00000000"}\n')
    out = json.loads(run_python(RESUME, how, "0.2", cwd=ff_project, env=env).stdout)
    assert out["error"] == (
        "run job-9: param 'lr' is already '0.1'; cannot change it to '0.2' (params are "
        "write-once; log values that change as metrics or tags)"
    )
    events = [e for seg in segments(spool, "job-9") for e in read(seg)[0]]
    params = [p["d"] for p in payloads(events, "params")]
    assert params[-1] == {"new": "y"}  # the refused call wrote nothing
    assert {"lr": "0.2"} not in params


# --- 6: a reference records the store its entry came from ---------------------------------------


def test_an_entry_of_another_store_records_that_store(
    tracker: Tracker, spool_root: Path, tmp_path: Path
) -> None:
    other = ArtifactStore(root=tmp_path / "other")
    entry = other.add_bytes(b"board", "out/board.kicad_pcb")
    with tracker.start_run() as run:
        run.log_artifact_reference(entry)
        run.log_artifact_reference(entry, store_root=tmp_path / "explicit")
    refs = payloads(run_events(spool_root, run.run_id), "artifact_ref")
    assert [r["store"] for r in refs] == [
        str(tmp_path / "other"),
        str(tmp_path / "explicit"),
    ]
    assert refs[0]["digest"] == entry.digest and refs[0]["size"] == 5


# --- 8: references ff-sync can always write -------------------------------------------------------


def test_a_path_component_longer_than_name_max_is_refused_everywhere(tmp_path: Path) -> None:
    assert validate_logical_path("a/" + "x" * 255) == "a/" + "x" * 255
    for bad in ("a/" + "x" * 256, "é" * 128 + "/b"):  # 256 bytes, in characters or in UTF-8
        with pytest.raises(InvalidLogicalPath, match=r"is 256 bytes in UTF-8 .*at most 255"):
            validate_logical_path(bad)
    with pytest.raises(InvalidLogicalPath, match="not valid Unicode"):
        validate_logical_path("data_\udce9.csv")
    with pytest.raises(InvalidLogicalPath):
        ArtifactStore(root=tmp_path / "store").add_bytes(b"x", "y" * 300)


def test_a_reference_whose_document_name_is_too_long_is_refused(
    tracker: Tracker, spool_root: Path
) -> None:
    with tracker.start_run() as run:
        run.log_artifact_reference("d/" + "x" * 250, DIGEST, 1)  # x….json: 255 bytes
        for bad in ("d/" + "x" * 251, "é" * 126):
            with pytest.raises(ValidationError) as e:
                run.log_artifact_reference(bad, DIGEST, 1)
            assert str(e.value).startswith(f"run {run.run_id}: artifact reference {bad!r}: ")
            assert "would be 256 bytes" in str(e.value) or "would be 257 bytes" in str(e.value)
    paths = [r["path"] for r in payloads(run_events(spool_root, run.run_id), "artifact_ref")]
    assert paths == ["d/" + "x" * 250]


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [("a", "a.json/x", "a.json"), ("a.json/x", "a", "a.json"), ("p/q", "p/q.json/r/s", "p/q.json")],
)
def test_a_name_that_would_be_both_file_and_folder_is_refused(
    tracker: Tracker, spool_root: Path, first: str, second: str, clash: str
) -> None:
    with tracker.start_run() as run:
        run.log_artifact_reference(first, DIGEST, 1)
        with pytest.raises(ValidationError) as e:
            run.log_artifact_reference(second, DIGEST, 1)
        assert str(e.value) == (
            f"run {run.run_id}: artifact reference {second!r} conflicts with reference "
            f"{first!r} of this run: ff-sync stores each as <path>.json, and {clash!r} would "
            "have to be both a file and a folder"
        )
        # Documents a.json and folder a do not clash; nor does logging a reference again.
        for fine in ("b", "b/c", "b.json.x/y", first):
            run.log_artifact_reference(fine, DIGEST, 1)
    paths = [r["path"] for r in payloads(run_events(spool_root, run.run_id), "artifact_ref")]
    assert paths == [first, "b", "b/c", "b.json.x/y", first]


def test_a_resumed_run_knows_its_earlier_references(tracker: Tracker) -> None:
    with tracker.start_run(run_id="refs") as run:
        run.log_artifact_reference("model", DIGEST, 1)
    with (
        tracker.start_run(run_id="refs") as again,
        pytest.raises(ValidationError, match="conflicts with reference 'model'"),
    ):
        again.log_artifact_reference("model.json/weights", DIGEST, 1)


# --- 13, 14, 15: names and text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"experiment_name": "e" * 501},
            "experiment_name 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee'... is 501 characters "
            "(MLflow allows at most 500)",
        ),
        (
            {"run_name": "r" * 251},
            "run_name 'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr'... is 251 characters "
            "(MLflow allows at most 250)",
        ),
        (
            {"run_name": "data_\udce9t\udce9"},
            "run_name 'data_\\udce9t\\udce9' is not valid Unicode text (lone surrogate "
            "'\\udce9' at index 5; decode bytes before passing them)",
        ),
        (
            {"experiment_name": "\ud800"},
            "experiment_name '\\ud800' is not valid Unicode text (lone surrogate '\\ud800' at "
            "index 0; decode bytes before passing them)",
        ),
        ({"experiment_name": "a\x00b"}, "experiment_name 'a\\x00b' contains a NUL character"),
    ],
)
def test_names_mlflow_cannot_store_are_refused_at_start(
    tracker: Tracker, spool_root: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as e:
        tracker.start_run(**kwargs)
    assert str(e.value) == message
    assert no_segments(spool_root) and tracker.active_run() is None


def test_name_limits_are_mlflows_and_inclusive(tracker: Tracker) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlRun
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    assert MAX_EXPERIMENT_NAME_LENGTH == 500 and SqlRun.name.type.length == 250
    with tracker.start_run(experiment_name="e" * 500, run_name="r" * 250) as run:
        pass
    assert (len(run.experiment_name), len(run.run_name)) == (500, 250)


class BrokenStr:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_a_value_whose_str_raises_is_a_validation_error_naming_the_key(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        for call, what in (
            (lambda: run.log_param("cfg", BrokenStr()), "param"),
            (lambda: run.set_tag("cfg", BrokenStr()), "tag"),
            (lambda: run.log_params({"ok": 1, "cfg": BrokenStr()}), "param"),
        ):
            with pytest.raises(ValidationError) as e:
                call()
            assert str(e.value) == (
                f"run {run.run_id}: {what} 'cfg' value: str() of the BrokenStr raised "
                "RuntimeError: no text for you"
            )
    with pytest.raises(ValidationError, match="tag 'cfg' value: str"):
        tracker.start_run(tags={"cfg": BrokenStr()})


def test_non_utf8_argv_and_user_are_recorded_replaced_and_never_fail_the_job(
    ff_project: Path,
) -> None:
    code = (
        "from formula_foundry.tracking import get_tracker\n"
        "with get_tracker().start_run() as run:\n"
        "    print(run.run_id)\n"
    )
    env = {k.encode(): v.encode() for k, v in child_env().items()}
    env.update({b"USER": b"us\xe9r", b"LOGNAME": b"us\xe9r"})
    result = subprocess.run(
        [sys.executable, "-c", code, b"data_\xe9t\xe9.csv", "d\u00e9j\u00e0"],
        cwd=ff_project,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    run_id = result.stdout.decode().strip()
    (segment,) = segments(ff_project / "data" / "runs", run_id)
    start = read_clean(segment)[1].data
    assert start["command"] == ["-c", "data_\\xe9t\\xe9.csv", "déjà"]
    assert start["user"] == "us\\xe9r"


def test_a_record_that_cannot_be_serialised_opens_no_segment(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "r1", "write")
    with pytest.raises(TypeError):
        writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "\udce9"}})
    assert list(tmp_path.glob("r1/seg-*")) == []  # no header-only segment
    writer.append({"v": 1, "s": 0, "t": 1, "k": "tags", "d": {"a": "b"}})
    assert [e.kind for e in read_clean(writer.path)] == ["segment", "tags"]  # type: ignore[arg-type]
    writer.close()


def test_an_event_longer_than_a_spool_line_may_be_is_refused(tracker: Tracker) -> None:
    # Each value escapes to 6000 x 6 bytes in JSON: 2000 of them exceed the reader's limit, so
    # the tracker must refuse the call rather than write a line every reader would skip.
    params = {f"p{i}": "\x01" * 6000 for i in range(2000)}
    with tracker.start_run() as run:
        with pytest.raises(ValidationError, match="longer than a spool line may be"):
            run.log_params(params)
        run.log_params({"p0": "small"})  # the refused call consumed nothing
        path = run.spool_path
    assert path is not None
    assert [e.kind for e in read_clean(path)][-2:] == ["params", "run_end"]


def test_ids_with_a_trailing_newline_are_refused(
    tracker: Tracker, spool_root: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("FF_RUN_ID", "myrun\n")
    with pytest.raises(ValidationError, match=r"^FF_RUN_ID: run id 'myrun\\n' is not valid"):
        tracker.start_run()
    clean_env.delenv("FF_RUN_ID")
    with pytest.raises(ValidationError, match=r"^run id 'x\\n' is not valid"):
        tracker.start_run(run_id="x\n")
    with pytest.raises(ValidationError, match=r"^run id 'x\\n' is not valid"):
        tracker.attach_run("x\n")
    assert no_segments(spool_root)


# --- 16: a full disk in buffered mode says what was lost ------------------------------------------

BUFFERED_FULL = """
    import json, os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    from formula_foundry.errors import SpoolWriteError
    from formula_foundry.tracking import get_tracker
    from formula_foundry.tracking.spool_writer import flush_all

    run = get_tracker().start_run(run_name="full")
    path = run.spool_path
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 1000, hard))
    returned, message = 0, None
    while message is None:
        try:
            run.log_metric("m", returned * 0.5, step=returned)
            returned += 1
        except SpoolWriteError as exc:
            message = str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size, hard))  # no room at all
    for i in range(3):  # buffered again; then lost at the flush (here: as at exit)
        run.log_metric("late", float(i))
    flush_all()
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    run.end()
    print(json.dumps({"run": run.run_id, "path": str(path), "message": message,
                      "returned": returned}))
"""


def test_a_full_disk_in_buffered_mode_says_what_was_lost(ff_project: Path) -> None:
    result = run_python(BUFFERED_FULL, cwd=ff_project, env=child_env(FF_DURABILITY="buffered"))
    out = json.loads(result.stdout)
    # run_start and every metric that returned were still in the buffer with the failing one.
    match = re.fullmatch(
        rf"run {out['run']}: could not write to spool segment {re.escape(out['path'])}: File "
        rf"too large \(lost: {out['returned'] + 1} buffered events of earlier calls and this "
        r"call's event, (\d+) bytes\)",
        out["message"],
    )
    assert match, out["message"]
    assert int(match[1]) >= 64 * 1024
    # The flush at exit cannot raise to anyone: it says so on stderr, one line.
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert re.fullmatch(
        rf"formula-foundry tracker: run {out['run']}: could not write to spool segment .*: "
        r"File too large \(lost: 3 buffered events of earlier calls, \d+ bytes\)",
        line,
    )
    events, problems, _ = read(Path(out["path"]))
    assert [p.kind for p in problems] == ["sequence"]  # the loss shows as a gap, nothing torn
    assert [e.kind for e in events] == ["segment", "run_end"]


# --- 18: a run folder that is a symbolic link -----------------------------------------------------


def test_a_symlinked_run_folder_is_refused(
    tracker: Tracker, spool_root: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spool_root.mkdir(parents=True)
    (spool_root / "linked").symlink_to(elsewhere)
    with pytest.raises(SpoolWriteError) as e:
        tracker.start_run(run_id="linked")
    assert str(e.value) == (
        f"run linked: spool folder {spool_root / 'linked'} is a symbolic link; the spool must "
        "be a real folder (ff-sync does not follow links in the spool)"
    )
    assert list(elsewhere.iterdir()) == [] and tracker.active_run() is None
    (spool_root / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SpoolWriteError, match="dangling is a symbolic link"):
        tracker.start_run(run_id="dangling")


def test_a_symlinked_spool_root_is_fine(ff_project: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (ff_project / "data").mkdir()
    (ff_project / "data" / "runs").symlink_to(scratch)
    with get_tracker().start_run() as run:
        run.log_metric("m", 1.0)
    assert [e.kind for e in run_events(scratch, run.run_id)] == [
        "segment",
        "run_start",
        "metrics",
        "run_end",
    ]


def test_the_resume_scan_takes_only_params_and_references_the_run_logged(
    tracker: Tracker, spool_root: Path
) -> None:
    with tracker.start_run(run_id="scan") as run:
        run.set_tags({"k": "params", "d": "x"})  # the marker's bytes inside another kind
        run.log_metrics({f"m{i}": float(i) for i in range(40)})
        run.log_params({"lr": "0.1"})
        run.log_artifact_reference("a/b", DIGEST, 1)
        run.log_params({"lr": "0.1", "seed": "3"})
    with (segments(spool_root, "scan")[0]).open("ab") as fh:
        fh.write(b"\x00" * 100_000 + b"\n")  # a NUL hole, then a later process's segment
    with tracker.start_run(run_id="scan") as again:
        again.log_artifact_reference("c", DIGEST, 1)
    logged = read_logged(spool_root, "scan")
    assert logged.params == {"lr": "0.1", "seed": "3"}
    assert logged.artifact_paths == ["a/b", "c"]
    assert read_logged(spool_root, "no-such-run").params == {}
