"""Differential suite of the drop-in: unmodified MLflow scripts, run twice.

Each script runs once straight into MLflow's SQLite store (``direct/direct.db``) and once into a
spool (``spooled/spool``), which ``ff-sync`` then replays into a fresh store (``synced.db``).
Both processes start the script as ``python script.py`` from a folder of their own, so MLflow's
system tags (``mlflow.source.name``, ``mlflow.user``, ...) are the same either way.

Most scripts run as children of a zygote that imported MLflow once (``forked_ways``: a second
or two per script); two run as new Python processes into stores they create (``ways``), as a
user runs them, so that nothing rests on the zygote.

The two stores must hold the same (``_compare.dump``: equal up to ids, wall-clock times and
``ff.*`` bookkeeping), and the scripts must print the same lines: each call whose outcome
matters prints ``ok`` or the exception's class and MLflow error code (``_compare.PRELUDE``).
"""

from __future__ import annotations

import sys
from typing import Any

from tests.dropin._compare import (
    PRELUDE,
    assert_same,
    assert_same_output,
    dump,
    output_problem,
    store_problem,
)
from tests.dropin.conftest import Ways

# Times scripts choose themselves are below this; wall-clock times (ms since 1970) are not.
CHOSEN = 10**12


def differential(ways: Ways, code: str, **dump_kw: Any) -> list[str]:
    """Run ``code`` both ways, sync, compare outputs and stores (reporting both differences
    at once); return the output lines."""
    direct, spooled = ways.run(PRELUDE + code)
    ways.sync()
    problems = [
        output_problem(direct.stdout, spooled.stdout),
        store_problem(ways.direct_db, ways.synced_db, **dump_kw),
    ]
    found = [p for p in problems if p is not None]
    assert not found, "\n\n".join(found)
    return direct.stdout.splitlines()


# -- fluent API ---------------------------------------------------------------------------------

FLUENT = """
import math
import sys

import numpy as np

nan, inf = float("nan"), float("inf")

with mlflow.start_run(run_name="in default"):
    mlflow.log_metric("m", 1.0)

mlflow.set_experiment("fluent")
with mlflow.start_run(run_name="basics", tags={"team": "a", "n": 3}, description="first run"):
    mlflow.log_param("lr", 0.001)
    mlflow.log_params({"layers": 3, "act": "relu", "none": None, "opt": {"a": [1, 2]}})
    mlflow.log_param("lr", "0.001")  # the same text again: a no-op
    mlflow.set_tag("stage", "dev")
    mlflow.set_tags({"k1": 1, "k2": "two\\nlines", "mlflow.note.content": "new description"})
    mlflow.set_tag("stage", "prod")  # tags: last write wins
    for step in range(5):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_metrics({"a": 1, "b": 2.5, "c": -3}, step=7)
    mlflow.log_metrics({"a": 2, "b": 3.5}, step=8)
    mlflow.log_metric("no step", 4.0)
    odd = [nan, inf, -inf, -0.0, 0.0, 2**53 + 1, 2**70, 1e-310, 5e-324, sys.float_info.max,
           -sys.float_info.max, True, False, np.float32(0.1), np.int64(7), np.float64(nan),
           "2.5", 10**300]
    for i, v in enumerate(odd):
        do(f"odd value {i} {type(v).__name__}", mlflow.log_metric, "odd", v, step=i)
    mlflow.log_metric("steps", 1.0, step=-3)
    mlflow.log_metric("steps", 2.0, step=2**62)
    mlflow.log_metric("steps", 3.0, step=-(2**63))
    mlflow.log_metric("steps", 4.0, step=2**63 - 1)
    # (not step=np.int64(12): MLflow's SQLite store writes that step as an 8-byte BLOB)
    mlflow.log_metric("only nan", nan)
    mlflow.log_metric("ends inf", 1.0, step=0)
    mlflow.log_metric("ends inf", inf, step=1)
    mlflow.log_metric("ends -inf", 1.0, step=0)
    mlflow.log_metric("ends -inf", -inf, step=1)
    mlflow.log_metric("ends nan", 5.0, step=1)
    mlflow.log_metric("ends nan", nan, step=2)
    mlflow.log_metric("nan then 0", nan, step=3)
    mlflow.log_metric("nan then 0", 0.0, step=4)
    mlflow.log_metric("neg zero", -0.0, step=1)
    mlflow.log_metric("x/y:z w-v.u", 1.0)  # every character MLflow allows in a key
    mlflow.log_params({f"p{i}": i for i in range(150)})  # over the 100 params of one batch
    mlflow.log_metrics({f"k{i}": float(i) for i in range(1200)}, step=1)  # over 1000 metrics

try:
    with mlflow.start_run(run_name="raises"):
        mlflow.log_metric("x", 1)
        raise ValueError("boom")
except ValueError:
    print("raised")

mlflow.set_experiment("Ünïcode ✓ experiment")
with mlflow.start_run(run_name="名前 ✓ run"):
    mlflow.log_param("ключ", "значение ✓")
    mlflow.set_tag("emoji", "🚀")

run = mlflow.start_run(run_name="left open")  # ended by MLflow at exit (FINISHED)
mlflow.log_metric("m", 1.0)
print(mlflow.active_run().info.run_name)
"""


def test_fluent_api_with_odd_values_and_several_experiments(ways: Ways) -> None:
    """As a user runs it: new processes (no zygote), stores created on first use."""
    lines = differential(ways, FLUENT)
    assert "raised" in lines and "left open" in lines
    runs = dump(ways.synced_db)
    assert runs["experiments"] == ["Default", "fluent", "Ünïcode ✓ experiment"]
    assert runs["fluent/raises"]["status"] == "FAILED"
    assert runs["fluent/basics"]["latest"]["ends nan"] == (2, "NaN")


# -- experiments --------------------------------------------------------------------------------

EXPERIMENTS = """
import os

client = MlflowClient()
a = mlflow.create_experiment("by create")
b = client.create_experiment("by client")
do("create again", mlflow.create_experiment, "by create")
do("client create again", client.create_experiment, "by client")
print(client.get_experiment_by_name("by create").name, client.get_experiment(b).name)
print(client.get_experiment_by_name("no such experiment"))
do("get unknown id", client.get_experiment, "424242")
do("set unknown id", mlflow.set_experiment, experiment_id="424242")

with mlflow.start_run(run_name="by id", experiment_id=a):
    mlflow.log_param("where", "a")
mlflow.set_experiment(experiment_id=b)
with mlflow.start_run(run_name="by set id"):
    mlflow.log_param("where", "b")
exp = mlflow.set_experiment("by name")
print(exp.name, exp.lifecycle_stage)
with mlflow.start_run(run_name="by name"):
    mlflow.log_param("where", "c")
mlflow.set_experiment("by create")  # exists: set, not created
with mlflow.start_run(run_name="again by name"):
    pass
names = sorted(e.name for e in client.search_experiments())
print(names)
"""


def test_experiments_created_and_chosen_every_way(forked_ways: Ways) -> None:
    lines = differential(forked_ways, EXPERIMENTS)
    assert lines[:2] == [
        "create again: MlflowException(RESOURCE_ALREADY_EXISTS)",
        "client create again: MlflowException(RESOURCE_ALREADY_EXISTS)",
    ]
    assert dump(forked_ways.synced_db)["experiments"] == [
        "Default",
        "by client",
        "by create",
        "by name",
    ]


ENV_EXPERIMENT = """
with mlflow.start_run(run_name="from the environment"):
    mlflow.log_metric("m", 1.0)
"""


def test_experiment_named_by_environment(forked_ways: Ways) -> None:
    direct, spooled = forked_ways.run(
        PRELUDE + ENV_EXPERIMENT, {"MLFLOW_EXPERIMENT_NAME": "env exp"}
    )
    assert_same_output(direct.stdout, spooled.stdout)
    forked_ways.sync()
    runs = assert_same(forked_ways.direct_db, forked_ways.synced_db)
    assert "env exp/from the environment" in runs


# -- nested runs --------------------------------------------------------------------------------

NESTED = """
client = MlflowClient()
mlflow.set_experiment("nested")
with mlflow.start_run(run_name="parent") as parent:
    mlflow.log_param("level", 0)
    with mlflow.start_run(run_name="child", nested=True) as child:
        mlflow.log_param("level", 1)
        with mlflow.start_run(run_name="grandchild", nested=True):
            mlflow.log_param("level", 2)
            mlflow.end_run("KILLED")
        do("second active run", mlflow.start_run, run_name="not nested")
    with mlflow.start_run(run_name="second child", nested=True):
        mlflow.log_metric("m", 2.0, step=1)
    pid = parent.info.run_id
with mlflow.start_run(run_name="by parent_run_id", parent_run_id=pid):
    pass
exp = mlflow.get_experiment_by_name("nested").experiment_id
orphan = client.create_run(exp, run_name="client child", tags={"mlflow.parentRunId": pid})
client.set_terminated(orphan.info.run_id)
other = mlflow.set_experiment("elsewhere").experiment_id
with mlflow.start_run(run_name="child in another experiment", parent_run_id=pid):
    pass
print(sorted(r.info.run_name for r in client.search_runs(
    [exp], f"tags.`mlflow.parentRunId` = '{pid}'")))
"""


def test_nested_runs(forked_ways: Ways) -> None:
    lines = differential(forked_ways, NESTED)
    assert lines[0] == "second active run: Exception"
    runs = dump(forked_ways.synced_db)
    assert runs["nested/grandchild"]["tags"]["mlflow.parentRunId"] == "child"
    assert runs["elsewhere/child in another experiment"]["tags"]["mlflow.parentRunId"] == "parent"


# -- client API, explicit times, log_batch ------------------------------------------------------

CLIENT = """
import math

nan, inf = float("nan"), float("inf")
client = MlflowClient()
exp = client.create_experiment("client")
run = client.create_run(exp, run_name="client run", tags={"t": "1", "mlflow.note.content": "d"},
                        start_time=1_000)
rid = run.info.run_id
client.log_param(rid, "p", "v")
client.log_metric(rid, "m", 1.0, timestamp=5_000, step=1)
client.set_tag(rid, "t", "2")
client.log_batch(
    rid,
    metrics=[Metric("big", float(i), 10_000 + i, i) for i in range(2_500)],
    params=[Param(f"bp{i}", str(i)) for i in range(150)],
    tags=[RunTag(f"bt{i}", str(i)) for i in range(120)],
)
# Ties at one step: the latest is the greatest (timestamp, value), NaN counting as 0.
for i, v in enumerate([3.0, nan, -inf, 7.0, inf, -0.0]):
    client.log_metric(rid, "ties", v, timestamp=9_000, step=9)
for i, v in enumerate([3.0, nan]):
    client.log_metric(rid, "nan wins later", v, timestamp=9_000 + i, step=9)
for v in [-1.0, nan]:
    client.log_metric(rid, "nan over negative", v, timestamp=100, step=0)
client.log_metric(rid, "dup", 1.0, timestamp=7, step=1)
client.log_metric(rid, "dup", 1.0, timestamp=7, step=1)  # identical: one row
client.log_batch(rid, metrics=[Metric("m", 2.0, 6_000, 2), Metric("m", 3.0, 6_000, 2)])
do("empty batch", client.log_batch, rid, metrics=[], params=[], tags=[])
client.log_metric(rid, "zero time", 1.0, timestamp=0, step=3)
client.set_terminated(rid, "FINISHED", end_time=20_000)
child = client.create_run(exp, run_name="client child", tags={"mlflow.parentRunId": rid},
                          start_time=30_000)
client.log_batch(child.info.run_id, metrics=[Metric("m", nan, 31_000, 0)])
client.set_terminated(child.info.run_id, "KILLED", end_time=32_000)
got = client.get_run(rid)
print(got.info.status, got.info.run_name, got.data.params["p"], got.data.metrics["ties"])
print([(m.step, m.value) for m in client.get_metric_history(rid, "m")])
"""


def test_client_api_with_chosen_times(forked_ways: Ways) -> None:
    differential(forked_ways, CLIENT, chosen_below=CHOSEN)
    runs = dump(forked_ways.synced_db, chosen_below=CHOSEN)
    assert runs["client/client run"]["times"] == (1_000, 20_000)
    # +inf is stored as the greatest float, and wins the tie at (step 9, time 9000)
    assert runs["client/client run"]["latest"]["ties"] == (9, sys.float_info.max, 9_000)


# -- asynchronous calls -------------------------------------------------------------------------

ASYNC = """
client = MlflowClient()
mlflow.set_experiment("async")
with mlflow.start_run(run_name="async") as run:
    rid = run.info.run_id
    ops = [
        mlflow.log_metric("m", 1.0, step=1, synchronous=False),
        mlflow.log_metrics({"a": 1.0, "b": 2.0}, step=2, synchronous=False),
        mlflow.log_param("p", 1, synchronous=False),
        mlflow.log_params({"q": 2, "r": 3}, synchronous=False),
        mlflow.set_tag("t", "x", synchronous=False),
        mlflow.set_tags({"u": "y"}, synchronous=False),
        client.log_batch(rid, metrics=[Metric("c", 5.0, 1_700, 3)], synchronous=False),
    ]
    for op in ops:
        op.wait()
    do("async param conflict", mlflow.log_param, "p", 2, synchronous=False)
    do("async bad key", mlflow.log_metric, "bad!", 1.0, synchronous=False)
    for step in range(50):  # not waited for: end_run flushes MLflow's queue
        mlflow.log_metric("unwaited", float(step), step=step, synchronous=False)
mlflow.config.enable_async_logging(True)
with mlflow.start_run(run_name="async by config"):
    for step in range(20):
        mlflow.log_metric("m", step * 0.5, step=step)
    mlflow.log_param("p", "x")
    mlflow.set_tag("t", "y")
mlflow.config.enable_async_logging(False)
"""


def test_asynchronous_calls(forked_ways: Ways) -> None:
    lines = differential(forked_ways, ASYNC)
    assert lines == [
        "async param conflict: MlflowException(INTERNAL_ERROR)",
        "async bad key: MlflowException(INTERNAL_ERROR)",  # RunOperations.wait's own error
    ]


# -- statuses -----------------------------------------------------------------------------------

STATUSES = """
client = MlflowClient()
exp = mlflow.set_experiment("statuses").experiment_id
for status in ("FINISHED", "FAILED", "KILLED"):
    mlflow.start_run(run_name=f"end_run {status}")
    mlflow.end_run(status)
    run = client.create_run(exp, run_name=f"set_terminated {status}")
    client.set_terminated(run.info.run_id, status)
    run = client.create_run(exp, run_name=f"update_run {status}")
    client.update_run(run.info.run_id, status=status)
client.create_run(exp, run_name="never ended")
run = client.create_run(exp, run_name="ended then running")
client.set_terminated(run.info.run_id, "FAILED")
client.update_run(run.info.run_id, status="RUNNING")
print(client.get_run(run.info.run_id).info.status)
run = client.create_run(exp, run_name="ended twice")
client.set_terminated(run.info.run_id, "KILLED")
client.set_terminated(run.info.run_id, "FINISHED")
with mlflow.start_run(run_name="default end"):
    pass
try:
    with mlflow.start_run(run_name="interrupted"):
        raise KeyboardInterrupt
except KeyboardInterrupt:
    pass
do("unknown status", client.set_terminated, run.info.run_id, "DONE")
do("end unknown run", client.set_terminated, "0123456789abcdef0123456789abcdef")
mlflow.end_run()  # nothing active: a no-op
"""


def test_every_way_to_end_a_run(forked_ways: Ways) -> None:
    lines = differential(forked_ways, STATUSES)
    assert lines[0] == "RUNNING"
    runs = dump(forked_ways.synced_db)
    assert runs["statuses/never ended"]["status"] == "RUNNING"
    assert runs["statuses/ended then running"]["status"] == "RUNNING"
    assert runs["statuses/update_run KILLED"]["status"] == "KILLED"


# -- rename -------------------------------------------------------------------------------------

RENAME = """
client = MlflowClient()
exp = mlflow.set_experiment("rename").experiment_id
with mlflow.start_run(run_name="before") as run:
    client.update_run(run.info.run_id, name="after")
    print(mlflow.active_run().info.run_id == run.info.run_id)
with mlflow.start_run(run_name="by tag"):
    mlflow.set_tag("mlflow.runName", "renamed by tag")
run = client.create_run(exp, run_name="client before")
client.update_run(run.info.run_id, name="client after", status="KILLED")
run = client.create_run(exp, run_name="ended first")
client.set_terminated(run.info.run_id)
client.update_run(run.info.run_id, name="renamed after end")
client.update_run(run.info.run_id, name="")  # an empty name: no change
run = client.create_run(exp, run_name="twice")
client.update_run(run.info.run_id, name="twice 1")
client.update_run(run.info.run_id, name="twice 2")
print(client.get_run(run.info.run_id).info.run_name)
do("rename unknown run", client.update_run, "0123456789abcdef0123456789abcdef", name="x")
"""


def test_rename(forked_ways: Ways) -> None:
    lines = differential(forked_ways, RENAME)
    assert lines[:2] == ["True", "twice 2"]
    runs = dump(forked_ways.synced_db)
    assert runs["rename/after"]["tags"]["mlflow.runName"] == "after"
    assert "rename/renamed by tag" in runs


# -- delete_tag ---------------------------------------------------------------------------------

DELETE_TAG = """
client = MlflowClient()
mlflow.set_experiment("delete tag")
with mlflow.start_run(run_name="tags", description="described") as run:
    rid = run.info.run_id
    mlflow.set_tags({"a": 1, "b": 2, "c": 3, "d": 4})
    mlflow.delete_tag("a")
    client.delete_tag(rid, "b")
    do("delete missing", mlflow.delete_tag, "zzz")
    do("delete again", mlflow.delete_tag, "a")
    mlflow.set_tag("b", "again")
    mlflow.delete_tag("mlflow.note.content")
    print(sorted(k for k in mlflow.get_run(rid).data.tags if not k.startswith("mlflow.")))
client.delete_tag(rid, "c")  # on an ended run
do("delete on unknown run", client.delete_tag, "0123456789abcdef0123456789abcdef", "a")
with open("run_id.txt", "w") as f:
    f.write(rid)
"""

DELETE_TAG_LATER = """
client = MlflowClient()
rid = open("run_id.txt").read()
client.delete_tag(rid, "d")  # in a later process
do("delete deleted", client.delete_tag, rid, "a")
print(sorted(k for k in client.get_run(rid).data.tags if not k.startswith("mlflow.")))
"""


def test_delete_tag(forked_ways: Ways) -> None:
    lines = differential(forked_ways, DELETE_TAG)
    assert lines == [
        "delete missing: MlflowException(RESOURCE_DOES_NOT_EXIST)",
        "delete again: MlflowException(RESOURCE_DOES_NOT_EXIST)",
        "['b', 'c', 'd']",
        "delete on unknown run: MlflowException(RESOURCE_DOES_NOT_EXIST)",
    ]
    lines = differential(forked_ways, DELETE_TAG_LATER)
    assert lines == ["delete deleted: MlflowException(RESOURCE_DOES_NOT_EXIST)", "['b']"]
    tags = dump(forked_ways.synced_db)["delete tag/tags"]["tags"]
    assert "mlflow.note.content" not in tags and tags["b"] == "again"


# -- resume by id, across processes ------------------------------------------------------------

FIRST_JOB = """
mlflow.set_experiment("resume")
run = mlflow.start_run(run_name="requeued")
mlflow.log_param("p", 1)
for step in range(3):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
mlflow.set_tag("attempt", "1")
with open("run_id.txt", "w") as f:
    f.write(run.info.run_id)
mlflow.end_run("KILLED")  # the job was killed; the next one resumes the run
with mlflow.start_run(run_name="by environment") as other:
    mlflow.log_metric("loss", 9.0, step=0)
with open("env_run_id.txt", "w") as f:
    f.write(other.info.run_id)
"""

SECOND_JOB = """
import sys
rid = open("run_id.txt").read()
with mlflow.start_run(run_id=rid) as run:
    print(run.info.status, run.info.run_name, run.data.params, sorted(run.data.metrics))
    for step in range(3, 6):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_param("p", 1)  # the same value: fine
    do("param changed", mlflow.log_param, "p", 2)
    mlflow.set_tag("attempt", "2")
    with mlflow.start_run(run_name="child of a resumed run", nested=True):
        mlflow.log_metric("m", 1.0)
client = MlflowClient()
client.log_metric(rid, "after end", 1.0, step=1)  # into a run this process did not start
print(client.get_run(rid).info.status)
print([m.step for m in client.get_metric_history(rid, "loss")])
"""

THIRD_JOB = """
import os
wanted = os.environ["MLFLOW_RUN_ID"]  # MLflow removes it once it has used it
with mlflow.start_run() as run:
    print(run.info.run_id == wanted, run.info.run_name)
    mlflow.log_metric("loss", 8.0, step=1)
do("resume an unknown run", mlflow.start_run, run_id="0123456789abcdef0123456789abcdef")
"""


def test_resume_by_id_in_later_processes(ways: Ways) -> None:
    """Three jobs, each a new Python process (no zygote)."""
    direct, spooled = ways.run(PRELUDE + FIRST_JOB)
    assert_same_output(direct.stdout, spooled.stdout)
    direct, spooled = ways.run(PRELUDE + SECOND_JOB)
    lines = assert_same_output(direct.stdout, spooled.stdout)
    assert lines[1] == "param changed: MlflowException(INVALID_PARAMETER_VALUE)"
    assert lines[3] == "[0, 1, 2, 3, 4, 5]"
    ids = [(w / "env_run_id.txt").read_text() for w in (ways.direct, ways.spooled)]
    direct, spooled = ways.run(
        PRELUDE + THIRD_JOB, {"MLFLOW_RUN_ID": ids[0]}, env_spooled={"MLFLOW_RUN_ID": ids[1]}
    )
    lines = assert_same_output(direct.stdout, spooled.stdout)
    assert lines == [
        "True by environment",
        "resume an unknown run: MlflowException(RESOURCE_DOES_NOT_EXIST)",
    ]
    ways.sync()
    runs = assert_same(ways.direct_db, ways.synced_db)
    requeued = runs["resume/requeued"]
    assert requeued["status"] == "FINISHED" and requeued["tags"]["attempt"] == "2"
    assert [p[0] for p in requeued["metrics"]["loss"]] == [0, 1, 2, 3, 4, 5]
    assert runs["resume/by environment"]["latest"]["loss"] == (1, 8.0)


def test_resume_after_a_first_sync(forked_ways: Ways) -> None:
    """The spool is synced between the jobs: the second sync continues the same run."""
    direct, spooled = forked_ways.run(PRELUDE + FIRST_JOB)
    assert_same_output(direct.stdout, spooled.stdout)
    forked_ways.sync()
    direct, spooled = forked_ways.run(PRELUDE + SECOND_JOB)
    assert_same_output(direct.stdout, spooled.stdout)
    forked_ways.sync()
    assert_same(forked_ways.direct_db, forked_ways.synced_db)


# -- calls that fail ----------------------------------------------------------------------------

ERRORS = """
import os

nan = float("nan")
client = MlflowClient()
exp = mlflow.set_experiment("errors").experiment_id
missing = "0123456789abcdef0123456789abcdef"
with mlflow.start_run(run_name="errors") as run:
    rid = run.info.run_id
    mlflow.log_param("p", 1)
    do("param conflict", mlflow.log_param, "p", 2)
    do("params conflict", mlflow.log_params, {"new": 1, "p": 3})
    do("client param conflict", client.log_param, rid, "p", "x")
    do("batch conflict", client.log_batch, rid, metrics=[Metric("bm", 1.0, 5, 1)],
       params=[Param("p", "9"), Param("newp", "1")], tags=[RunTag("bt", "1")])
    do("batch duplicate param", client.log_batch, rid, params=[Param("q", "1"), Param("q", "2")])
    do("batch same param twice", client.log_batch, rid,
       params=[Param("q2", "1"), Param("q2", "1")])
    for key in ["bad!", "a//b", "/lead", "trail/", "..", "x" * 251, "", "sp ace ok"]:
        do(f"metric key {key[:10]!r}", mlflow.log_metric, key, 1.0)
        do(f"param key {key[:10]!r}", mlflow.log_param, key, 1)
        do(f"tag key {key[:10]!r}", mlflow.set_tag, key, 1)
    do("metric None", mlflow.log_metric, "v", None)
    do("metric text", mlflow.log_metric, "v", "abc")
    do("metric too big", mlflow.log_metric, "v", 10**400)
    do("metric list", mlflow.log_metric, "v", [1.0])
    do("negative timestamp", mlflow.log_metric, "v", 1.0, timestamp=-1)
    do("text step", mlflow.log_metric, "v", 1.0, step="1")
    do("metrics with a NaN", mlflow.log_metrics, {"w": nan, "bad!": 1.0})
    do("log to unknown run", client.log_metric, missing, "m", 1.0)
    do("param to unknown run", client.log_param, missing, "m", 1.0)
    do("tag to unknown run", client.set_tag, missing, "m", 1.0)
    do("batch to unknown run", client.log_batch, missing, metrics=[Metric("m", 1.0, 1, 1)])
    do("malformed run id", client.log_param, "nope", "p", 1)
    do("get unknown run", client.get_run, missing)
    do("history of unknown run", client.get_metric_history, missing, "m")
    do("update unknown run", client.update_run, missing, status="FAILED")
    do("create run in unknown experiment", client.create_run, "424242", run_name="x")
    do("start unknown run", mlflow.start_run, run_id=missing)
    do("second active run", mlflow.start_run, run_name="second")
    do("nested with unknown parent", mlflow.start_run, run_name="orphan", nested=True,
       parent_run_id=missing)
    # Bad arguments for a run that does not exist: MLflow checks the arguments first.
    do("bad tag key, unknown run", client.set_tag, missing, "bad!", "v")
    do("bad param key, unknown run", client.log_param, missing, "bad!", "v")
    do("bad metric value, unknown run", client.log_metric, missing, "m", "x")
    do("bad batch, unknown run", client.log_batch, missing, metrics=[Metric("bad!", 1.0, 1, 1)])
    # delete_tag looks the key up only: a key MLflow would refuse is simply not there.
    do("delete_tag of a bad key", mlflow.delete_tag, "bad!")
    do("delete_tag of an empty key", client.delete_tag, rid, "")
    # Entities built by hand with values MLflow's store does not take.
    do("batch metric without time", client.log_batch, rid, metrics=[Metric("m", 1.0, None, 1)])
    do("batch metric without step", client.log_batch, rid, metrics=[Metric("m", 1.0, 5, None)])
    do("batch tag holding an int", client.log_batch, rid, tags=[RunTag("t", 1)])
    print(sorted(client.get_run(rid).data.params))
"""


def test_failing_calls_fail_alike_and_write_nothing(forked_ways: Ways) -> None:
    lines = differential(forked_ways, ERRORS)
    assert lines[0] == "param conflict: MlflowException(INVALID_PARAMETER_VALUE)"
    assert "log to unknown run: MlflowException(RESOURCE_DOES_NOT_EXIST)" in lines


# -- where the spool is stricter than MLflow -----------------------------------------------------

STRICTER = """
mlflow.set_experiment("stricter")
with mlflow.start_run(run_name="stricter") as run:
    rid = run.info.run_id
    mlflow.log_metric("kept", 1.0, step=1)
    tries = [
        ("float step", mlflow.log_metric, "m", 1.0, 1.5),
        ("bool step", mlflow.log_metric, "m", 1.0, True),
        ("step beyond int64", mlflow.log_metric, "m", 1.0, 2**63),
        ("param over 6000 characters", mlflow.log_param, "long", "x" * 6001),
        ("tag over 8000 characters", mlflow.set_tag, "long", "x" * 8001),
        ("param with NUL", mlflow.log_param, "nul", "a\\x00b"),
        ("tag mlflow.user", mlflow.set_tag, "mlflow.user", "someone"),
        ("tag mlflow.source.name", mlflow.set_tag, "mlflow.source.name", "other.py"),
        ("tag mlflow.parentRunId", mlflow.set_tag, "mlflow.parentRunId", rid),
        ("tag ff.run_uuid", mlflow.set_tag, "ff.run_uuid", "x"),
        ("status SCHEDULED", MlflowClient().set_terminated, rid, "SCHEDULED"),
        # A parent MLflow does not check; in a spool it could never be linked after the sync.
        ("client run with unknown parent", MlflowClient().create_run, run.info.experiment_id,
         None, {"mlflow.parentRunId": "0" * 32}, "orphan"),
    ]
    for label, fn, *args in tries:
        do(label, fn, *args)
"""


def test_where_the_spool_refuses_what_mlflow_would_store(forked_ways: Ways) -> None:
    """Spool runs follow the tracker's rules: what MLflow silently truncates, stores oddly
    (float steps) or lets a user overwrite (the run's system tags) is refused with MLflow's
    INVALID_PARAMETER_VALUE, and nothing of it reaches the synced store."""
    direct, spooled = forked_ways.run(PRELUDE + STRICTER)
    labels = [line.split(":")[0] for line in direct.stdout.splitlines()]
    assert len(labels) == 12
    # MLflow stores all of it (a step beyond int64 fails inside SQLite) ...
    assert direct.stdout.splitlines() == [
        f"{label}: " + ("MlflowException(INTERNAL_ERROR)" if "int64" in label else "ok")
        for label in labels
    ]
    # ... the spool refuses each with MLflow's error for a bad argument.
    assert spooled.stdout.splitlines() == [
        f"{label}: MlflowException(INVALID_PARAMETER_VALUE)" for label in labels
    ]
    forked_ways.sync()
    synced = dump(forked_ways.synced_db)["stricter/stricter"]
    assert synced["metrics"] == {"kept": [(1, 1.0)]} and synced["params"] == {}
    assert synced["status"] == "FINISHED"
    assert not {"long", "mlflow.parentRunId", "ff.run_uuid"} & set(synced["tags"])
    assert synced["tags"]["mlflow.source.name"] == "script.py"


ALTERNATING = """
for i in range(3):
    for exp in ("left", "right"):
        mlflow.set_experiment(exp)
        with mlflow.start_run(run_name=f"run {i}"):
            mlflow.log_params({"i": i, "exp": exp})
            for step in range(3):
                mlflow.log_metric("m", i * 10 + step, step=step)
            mlflow.end_run("FINISHED" if i % 2 else "FAILED")
"""


def test_short_runs_alternating_between_experiments(forked_ways: Ways) -> None:
    differential(forked_ways, ALTERNATING)
    runs = dump(forked_ways.synced_db)
    assert runs["right/run 1"]["params"] == {"i": "1", "exp": "right"}
