"""Differential property of the drop-in: generated MLflow call sequences, run twice.

Hypothesis draws a short sequence of MLflow calls (fluent and client API: runs started, nested,
resumed, created by the client, ended with a status, terminated, renamed; params, metrics with
odd values, steps and times, tags, batches, synchronous=False calls, delete_tag; experiments).
``render`` turns it into an ordinary script that prints each call's outcome (``ok`` or the
exception class and MLflow error code). The script runs straight into SQLite and through a
spool + ``ff-sync``; the outputs and the two stores must be the same.

What the generator leaves out on purpose, because the spool refuses it by design where MLflow
accepts it (``test_differential.py::test_where_the_spool_refuses_what_mlflow_would_store``):
float or bool steps, steps beyond int64, over-long values, NUL characters, reserved tags.
Also left out: entities holding non-text values in ``log_batch`` (covered by
``test_failing_calls_fail_alike_and_write_nothing``). Each metric call passes a time of its own
or a step no other call uses, so which point is a key's latest never depends on two calls
falling into the same millisecond; the script flushes MLflow's queue of unwaited calls before it
exits (``FOOTER``).

Scripts and ff-sync run as children of the session's zygote (``conftest.Zygote``), from copies
of one empty store: about two seconds per example. ``FF_DROPIN_EXAMPLES`` (default 6) sets the
number of examples; they are derandomized (the same ones on every run, no example database).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.dropin._compare import PRELUDE, output_problem, store_problem
from tests.dropin.conftest import Ways, Zygote

CHOSEN = 10**12  # times the script chooses are below, wall-clock times above
MISSING = "0123456789abcdef0123456789abcdef"
EXPERIMENTS = ("Default", "exp one", "exp/two")
KEYS = ("a", "b", "loss", "x/y")
BAD_KEYS = ("bad!", "a//b", "")
STATUSES = ("FINISHED", "FAILED", "KILLED")

nan, inf = float("nan"), float("inf")
ODD_VALUES = (0.0, -0.0, 1.0, -1.5, nan, inf, -inf, 1e308, 5e-324, 2**53 + 1, 2**63, 2**70)
# Stored by MLflow as 1.0 / 0.0 / 3.5 (bools and numeric text), or refused (the rest).
ODDER_VALUES = (True, False, "3.5", "x", None, 10**400)


def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``rare`` one time in ten, else ``common``: most calls of a sequence should succeed."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 0 else common)


good_keys = st.sampled_from(KEYS)
keys = rarely(good_keys, st.sampled_from(BAD_KEYS))
metric_values = rarely(
    st.sampled_from(ODD_VALUES) | st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODDER_VALUES),
)
steps = st.integers(-3, 12) | st.sampled_from([2**62, -(2**63), 2**63 - 1])
times = st.none() | st.integers(1, 40)  # None: MLflow's wall clock
param_values = st.sampled_from(["1", 1, 2, "x", 1.5, None, True, "ünï"])
tag_values = st.sampled_from(["v", 1, "", "xyz", "ünï ✓", "a\nb"])
statuses = st.sampled_from(STATUSES)
run_refs = st.integers(0, 20)  # the n-th run named so far (modulo), or MISSING if none

ops = st.one_of(
    st.tuples(st.just("set_experiment"), st.sampled_from(EXPERIMENTS)),
    st.tuples(
        st.just("start"),
        st.booleans(),  # nested
        st.one_of(st.none(), st.dictionaries(good_keys, tag_values, max_size=2)),
        st.one_of(st.none(), st.just("described")),
    ),
    st.tuples(st.just("start_child_of"), run_refs),
    st.tuples(st.just("resume"), run_refs, st.booleans()),
    st.tuples(st.just("client_create"), st.sampled_from(EXPERIMENTS), st.none() | run_refs),
    st.tuples(st.just("end"), statuses),
    st.tuples(st.just("terminate"), run_refs, statuses, st.none() | st.integers(1, 40)),
    st.tuples(st.just("update"), run_refs, st.none() | st.sampled_from(("RUNNING", *STATUSES))),
    st.tuples(st.just("rename"), run_refs, st.booleans()),  # by client / by tag
    st.tuples(st.just("param"), st.none() | run_refs, keys, param_values, st.booleans()),
    st.tuples(st.just("params"), st.dictionaries(keys, param_values, min_size=1, max_size=3)),
    st.tuples(
        st.just("metric"),
        st.none() | run_refs,
        keys,
        metric_values,
        steps,
        times,
        st.sampled_from(["sync", "async", "unwaited"]),
    ),
    st.tuples(
        st.just("metrics"),
        st.dictionaries(keys, metric_values, min_size=1, max_size=3),
        steps,
        times,
        st.booleans(),
    ),
    st.tuples(st.just("tag"), st.none() | run_refs, keys, tag_values),
    st.tuples(st.just("tags"), st.dictionaries(keys, tag_values, min_size=1, max_size=3)),
    st.tuples(
        st.just("batch"),
        run_refs,
        st.lists(
            st.tuples(keys, metric_values, st.integers(1, 40), st.integers(-3, 12)), max_size=4
        ),
        st.dictionaries(keys, param_values, max_size=2),
        st.dictionaries(keys, tag_values, max_size=2),
        st.booleans(),
    ),
    st.tuples(st.just("delete_tag"), st.none() | run_refs, keys),
)
# Most sequences start with a run, so that fluent calls have one to log into.
first = st.sampled_from([[], [("start", False, None, None)], [("start", False, None, None)]])
programs = st.tuples(first, st.lists(ops, min_size=2, max_size=14)).map(lambda p: p[0] + p[1])


HEADER = """
import sys

nan, inf = float("nan"), float("inf")
MISSING = "%s"
client = MlflowClient()
R = {}  # run name -> run id


def run_id(name):
    return R.get(name, MISSING)


def exp_id(name):
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else "424242"


def fluent(label, fn, *args, **kwargs):
    # Without an active run MLflow would start one with a random name: report that instead.
    if mlflow.active_run() is None:
        print(f"{label}: no active run", flush=True)
        return None
    return do(label, fn, *args, **kwargs)


def started(name, run):
    if run is not None:
        R[name] = run.info.run_id
""".replace("%s", MISSING)


# MLflow's queue of synchronous=False calls races the interpreter's exit when a run is left
# open: "cannot schedule new futures after interpreter shutdown", and a call is lost (now and
# then). MLflow's advice is to end or flush before exiting; the script does (the spool writes
# each call before it returns and has no such race).
FOOTER = """
mlflow.flush_async_logging()
"""


def render(program: list[tuple[Any, ...]]) -> str:
    """The script of ``program``: one statement per call, its outcome printed."""
    lines = [HEADER]
    names: list[str] = []

    def ref(n: int | None) -> str:
        if n is None or not names:
            return "MISSING"
        return f"run_id({names[n % len(names)]!r})"

    for i, op in enumerate(program):
        kind, args = op[0], op[1:]
        label = f"{i} {kind}"
        if kind == "set_experiment":
            lines.append(f"do({label!r}, mlflow.set_experiment, {args[0]!r})")
        elif kind == "start":
            nested, tags, description = args
            name = f"r{i}"
            lines.append(
                f"started({name!r}, do({label!r}, mlflow.start_run, run_name={name!r}, "
                f"nested={nested!r}, tags={tags!r}, description={description!r}))"
            )
            names.append(name)
        elif kind == "start_child_of":
            name = f"r{i}"
            lines.append(
                f"started({name!r}, do({label!r}, mlflow.start_run, run_name={name!r}, "
                f"nested=True, parent_run_id={ref(args[0])}))"
            )
            names.append(name)
        elif kind == "resume":
            lines.append(
                f"do({label!r}, mlflow.start_run, run_id={ref(args[0])}, nested={args[1]!r})"
            )
        elif kind == "client_create":
            exp, parent = args
            name = f"r{i}"
            tags = "{}" if parent is None else f'{{"mlflow.parentRunId": {ref(parent)}}}'
            lines.append(
                f"started({name!r}, do({label!r}, client.create_run, exp_id({exp!r}), "
                f"run_name={name!r}, tags={tags}))"
            )
            names.append(name)
        elif kind == "end":
            lines.append(f"do({label!r}, mlflow.end_run, {args[0]!r})")
        elif kind == "terminate":
            run, status, end_time = args
            lines.append(
                f"do({label!r}, client.set_terminated, {ref(run)}, {status!r}, "
                f"end_time={end_time!r})"
            )
        elif kind == "update":
            lines.append(f"do({label!r}, client.update_run, {ref(args[0])}, status={args[1]!r})")
        elif kind == "rename":
            run, by_client = args
            if not names:
                continue
            old = names[run % len(names)]
            new = f"{old}~{i}"
            # the name follows the run in the script's table; the run keeps its id
            if by_client:
                call = f"do({label!r}, client.update_run, run_id({old!r}), name={new!r})"
            else:
                call = f"do({label!r}, client.set_tag, run_id({old!r}), 'mlflow.runName', {new!r})"
            lines.append(f"{call}\nR[{new!r}] = R.pop({old!r}, MISSING)")
            names[run % len(names)] = new
        elif kind == "param":
            run, key, value, sync = args
            if run is None:
                lines.append(
                    f"fluent({label!r}, mlflow.log_param, {key!r}, {value!r}, synchronous={sync!r})"
                )
            else:
                lines.append(f"do({label!r}, client.log_param, {ref(run)}, {key!r}, {value!r})")
        elif kind == "params":
            lines.append(f"fluent({label!r}, mlflow.log_params, {args[0]!r})")
        elif kind == "metric":
            run, key, value, step, t, mode = args
            if t is None or mode == "unwaited":
                # A wall-clock time (MLflow's queue writes an unwaited call when it likes):
                # a step no other call uses, so the latest point does not depend on the clock.
                t, step = None, 1000 + i
            if run is not None:
                lines.append(
                    f"do({label!r}, client.log_metric, {ref(run)}, {key!r}, {value!r}, "
                    f"step={step!r}, timestamp={t!r}, synchronous={mode == 'sync'!r})"
                )
            elif mode == "unwaited":  # MLflow's queue writes it later, or drops a bad one
                lines.append(
                    f"if mlflow.active_run() is not None:\n"
                    f"    try:\n"
                    f"        mlflow.log_metric({key!r}, {value!r}, step={step!r}, "
                    f"timestamp={t!r}, synchronous=False)\n"
                    f"    except Exception as exc:\n"
                    f"        print({label!r} + ': ' + outcome(exc))"
                )
            else:
                lines.append(
                    f"fluent({label!r}, mlflow.log_metric, {key!r}, {value!r}, step={step!r}, "
                    f"timestamp={t!r}, synchronous={mode == 'sync'!r})"
                )
        elif kind == "metrics":
            values, step, t, sync = args
            if t is None:
                step = 1000 + i
            lines.append(
                f"fluent({label!r}, mlflow.log_metrics, {values!r}, step={step!r}, "
                f"timestamp={t!r}, synchronous={sync!r})"
            )
        elif kind == "tag":
            run, key, value = args
            if run is None:
                lines.append(f"fluent({label!r}, mlflow.set_tag, {key!r}, {value!r})")
            else:
                lines.append(f"do({label!r}, client.set_tag, {ref(run)}, {key!r}, {value!r})")
        elif kind == "tags":
            lines.append(f"fluent({label!r}, mlflow.set_tags, {args[0]!r})")
        elif kind == "batch":
            run, metrics, params, tags, sync = args
            ms = ", ".join(f"Metric({k!r}, {v!r}, {t!r}, {s!r})" for k, v, t, s in metrics)
            # Entities hold text, as MLflow's own callers build them (MLflow's store fails on
            # a RunTag holding an int: test_differential.py covers such values).
            ps = ", ".join(f"Param({k!r}, {str(v)!r})" for k, v in params.items())
            ts = ", ".join(f"RunTag({k!r}, {str(v)!r})" for k, v in tags.items())
            lines.append(
                f"do({label!r}, client.log_batch, {ref(run)}, metrics=[{ms}], params=[{ps}], "
                f"tags=[{ts}], synchronous={sync!r})"
            )
        elif kind == "delete_tag":
            run, key = args
            if run is None:
                lines.append(f"fluent({label!r}, mlflow.delete_tag, {key!r})")
            else:
                lines.append(f"do({label!r}, client.delete_tag, {ref(run)}, {key!r})")
        else:  # pragma: no cover - the strategy above lists every kind
            raise AssertionError(kind)
    return PRELUDE + "\n".join(lines) + FOOTER


def check_program(
    root: Path, zygote: Zygote, empty_store: Path, program: list[tuple[Any, ...]]
) -> None:
    ways = Ways(Path(tempfile.mkdtemp(dir=root)), zygote)
    ways.start_from(empty_store)
    code = render(program)
    direct, spooled = ways.run(code)
    ways.sync()
    problems = [
        output_problem(direct.stdout, spooled.stdout),
        store_problem(ways.direct_db, ways.synced_db, chosen_below=CHOSEN),
    ]
    found = [p for p in problems if p is not None]
    assert not found, "\n\n".join(found) + f"\n\nthe script:\n{code}"


# One sequence with every kind of call, run on every test run besides what hypothesis draws.
EVERYTHING = [
    ("set_experiment", "exp one"),
    ("start", False, {"a": "v"}, "described"),
    ("param", None, "a", 1, True),
    ("param", None, "a", 2, False),
    ("metric", None, "loss", nan, 1, 5, "sync"),
    ("metric", None, "loss", -inf, 1, 5, "async"),
    ("metric", None, "b", -0.0, 2, None, "unwaited"),
    ("start", True, None, None),
    ("tags", {"x/y": "xyz", "b": 1}),
    ("delete_tag", None, "b"),
    ("end", "KILLED"),
    ("batch", 0, [("a", 2**70, 3, 3), ("a", inf, 3, 3)], {"p": "1"}, {"t": "v"}, False),
    ("rename", 1, True),
    ("client_create", "exp/two", 0),
    ("terminate", 2, "FAILED", 7),
]


@settings(
    max_examples=int(os.environ.get("FF_DROPIN_EXAMPLES", "6")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(program=programs)
@example(program=EVERYTHING)
def test_generated_call_sequences_store_the_same(
    tmp_path: Path, zygote: Zygote, empty_store: Path, program: list[tuple[Any, ...]]
) -> None:
    check_program(tmp_path, zygote, empty_store, program)


def test_render_reaches_every_kind_of_call() -> None:
    """The generator's vocabulary is all rendered (a kind never rendered tests nothing)."""
    code = render(EVERYTHING)
    for call in (
        "mlflow.set_experiment",
        "mlflow.start_run",
        "mlflow.log_param",
        "synchronous=False",
        "mlflow.set_tags",
        "mlflow.delete_tag",
        "mlflow.end_run",
        "client.log_batch",
        "client.update_run",
        "client.create_run",
        "client.set_terminated",
    ):
        assert call in code, call
    compile(code, "script.py", "exec")
