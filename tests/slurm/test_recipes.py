"""The documented Slurm recipe on a real Slurm: requeue, time limit, scancel, SIGKILL, arrays, srun.

Every job is ``docs/recipes/slurm-job.sbatch`` itself, submitted with ``sbatch`` from a project
folder holding the training script it runs (``my_pipeline.py``, below: it logs with
``formula_foundry.tracking``) and a ``config/mlflow.yaml``. The job's environment is the
submitter's (sbatch passes it on): the project's venv first on ``PATH`` (an activated venv) and
``FF_SPOOL_ROOT`` naming the project's spool. The spool is synced by the real ``ff-sync``
(``python -m formula_foundry.sync``, ``FF_SPOOL_ROOT`` and ``MLFLOW_TRACKING_URI=sqlite:///...``):
``ff-sync watch --interval 1`` (the login-node watcher of docs/recipes.md) runs for the whole
module, and each test waits, with a deadline, until the MLflow store shows its runs' final
state (MLflow is imported once, not per pass). The dead-run test has a project of its own,
whose watcher cannot ask Slurm and has a short ``sync.stale_after_s``.

The two time-limit jobs need a minute or more of Slurm time each: they are submitted when the
module starts (the partition lets jobs share cores) and checked by the last tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests.conftest import CONFIG_ENV_VARS, REPO_ROOT
from tests.slurm.conftest import Slurm, SlurmError, tail

# One cluster per session: every Slurm test runs on the same pytest-xdist worker.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

RECIPE = REPO_ROOT / "docs" / "recipes" / "slurm-job.sbatch"
PYTHON = sys.executable
VENV_BIN = str(Path(sys.executable).parent)
JOB_TIMEOUT_S = 120.0  # a short job, from submission to its end
TIME_LIMIT_TIMEOUT_S = 240.0  # --time=1: Slurm checks limits every 30 s, then KillWait
# The reason a run gets on SIGTERM early in a job with the recipe's --time=04:00:00 (a job
# already requeued when the tracker asks shows its whole limit again).
FOUR_HOURS_LEFT = r"SIGTERM in Slurm job %s, (?:4:00:00|3:5\d:\d\d) of its time limit left"
SYNC_TIMEOUT_S = 120.0  # the watcher's first pass imports MLflow and creates the store
SILENCE_S = 20.0  # sync.stale_after_s of the dead-run test's project

# The training script the recipe runs (``python -u my_pipeline.py "$@"``).
PIPELINE = r"""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from formula_foundry.tracking import get_tracker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3, help="steps each execution logs first")
parser.add_argument(
    "--then",
    default="end",
    choices=["end", "hold", "hold-once", "forever", "exit-without-end", "ranks"],
)
parser.add_argument("--checkpoint-s", type=float, default=0.0)
args = parser.parse_args()

env = os.environ
job = env["SLURM_JOB_ID"]
task = env.get("SLURM_ARRAY_TASK_ID")
restart = int(env.get("SLURM_RESTART_COUNT") or 0)
marks = Path("marks")
marks.mkdir(exist_ok=True)


def mark(name, text=""):
    tmp = marks / f".{name}.tmp"
    tmp.write_text(text)
    tmp.rename(marks / name)


tracker = get_tracker()
# FF_RUN_ID (set by the recipe) names the run; a requeued job resumes it. The tracker tags the
# run with the job's facts itself (slurm.job_id, slurm.array_task_id, ...).
run = tracker.start_run(run_name=f"task-{task}" if task is not None else f"job-{job}")
print(f"run {run.run_id} restart {restart} pid {os.getpid()}", flush=True)
run.log_param("steps_per_execution", args.steps)

if args.checkpoint_s:
    # The application's own SIGTERM handler (the tracker then installs none): a checkpoint
    # that takes a while, then the run ends KILLED.
    def on_term(signum, frame):
        time.sleep(args.checkpoint_s)
        run.end("KILLED")
        print("checkpointed and ended", flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)

step = restart * args.steps
for step in range(restart * args.steps, (restart + 1) * args.steps):
    run.log_metric("loss", 1.0 / (step + 1), step=step)
    print(f"returned {step}", flush=True)
mark(f"{job}-{restart}.ready")

if args.then == "hold" or (args.then == "hold-once" and restart == 0):
    while True:  # until Slurm signals the job
        time.sleep(0.05)
elif args.then == "forever":
    while True:
        step += 1
        run.log_metric("loss", 1.0 / (step + 1), step=step)
        print(f"returned {step}", flush=True)
        time.sleep(0.02)
elif args.then == "exit-without-end":
    os._exit(0)  # the job completes; the run has no end event
elif args.then == "ranks":
    # A multi-task step: every rank logs into this run through attach_run.
    subprocess.run(["srun", "--ntasks=2", sys.executable, "-u", "rank.py"], check=True)
run.end()
print("ended", flush=True)
"""

RANK = r"""
import os

from formula_foundry.tracking import get_tracker

rank = int(os.environ["SLURM_PROCID"])
run = get_tracker().attach_run(os.environ["FF_RUN_ID"])
for step in range(5):
    run.log_metric(f"rank{rank}.loss", rank + 1.0 / (step + 1), step=step)
run.log_param(f"rank{rank}.pid", os.getpid())
run.end()  # an attached handle only closes its own segment
print(f"rank {rank} pid {os.getpid()}", flush=True)
"""

CONFIG = """\
tracking:
  default_experiment: "slurm-recipes"
spool:
  root: "data/runs"
sync:
  state_dir: "data/sync"
  lock_timeout_s: 10
  stale_after_s: {stale_after_s}
"""


@dataclass
class Project:
    """A submit folder (the training script, config/mlflow.yaml, the spool) and its MLflow store,
    kept in sync by ``ff-sync watch``: tests wait until the store shows what they expect."""

    root: Path
    slurm: Slurm
    stale_after_s: float = 3600
    # False: the watcher runs where Slurm cannot be asked (no squeue on its PATH).
    scheduler: bool = True
    watcher: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.root / "data" / "runs"

    @property
    def db(self) -> Path:
        return self.root / "mlruns.db"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def watch_log(self) -> Path:
        return self.root / "watch.log"

    def setup(self) -> Project:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "my_pipeline.py").write_text(PIPELINE)
        (self.root / "rank.py").write_text(RANK)
        config = self.root / "config" / "mlflow.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG.format(stale_after_s=self.stale_after_s))
        return self

    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in self.slurm.env.items() if k not in CONFIG_ENV_VARS}

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, *sbatch_args: str, args: tuple[str, ...] = ()) -> str:
        """``sbatch <sbatch_args> docs/recipes/slurm-job.sbatch <args>`` from the project, with
        the venv active and the spool root set (what sbatch passes on to the job)."""
        env = self.base_env()
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env["FF_SPOOL_ROOT"] = str(self.spool)
        array = any(a.startswith("--array") for a in sbatch_args)
        return self.slurm.sbatch(
            f"--output={self.root / ('slurm-%A_%a.out' if array else 'slurm-%j.out')}",
            *sbatch_args,
            str(RECIPE),
            *args,
            cwd=self.root,
            env=env,
        )

    def output(self, job_id: str) -> str:
        path = self.root / f"slurm-{job_id}.out"
        return path.read_text() if path.exists() else f"(no {path.name})"

    def wait_mark(self, name: str, job_id: str, timeout: float = JOB_TIMEOUT_S) -> None:
        """Wait for the training script's mark file (it has logged its steps)."""
        path = self.root / "marks" / name
        self.slurm.wait_for(
            lambda: path.exists() or self.slurm.state(job_id) not in ("PENDING", "RUNNING"),
            timeout,
            f"{path} (job {job_id})",
            job_id,
        )
        if not path.exists():
            raise SlurmError(
                f"job {job_id} ended without writing {name}:\n{self.output(job_id)}\n"
                + self.slurm.diagnostics(job_id)
            )

    # -- the spool -------------------------------------------------------------------------

    def segments(self, run_id: str) -> list[Path]:
        return sorted((self.spool / run_id).glob("seg-*.jsonl"))

    def events(self, run_id: str) -> list[tuple[Path, Event]]:
        """Every event of a run's spool, with its segment."""
        out = []
        for seg in self.segments(run_id):
            out.extend((seg, item) for item in SegmentReader(seg) if isinstance(item, Event))
        return out

    def ends(self, run_id: str) -> list[str]:
        return [e.data["status"] for _, e in self.events(run_id) if e.kind == "run_end"]

    def reasons(self, run_id: str) -> list[str | None]:
        return [e.data.get("reason") for _, e in self.events(run_id) if e.kind == "run_end"]

    # -- the sync and the store ------------------------------------------------------------

    def start_watcher(self) -> None:
        """``ff-sync watch --interval 1`` with the spool root and the store in its environment."""
        env = {**self.base_env(), "FF_SPOOL_ROOT": str(self.spool), "MLFLOW_TRACKING_URI": self.uri}
        if not self.scheduler:
            # A sync host without Slurm's commands (python is called by its path).
            env["PATH"] = VENV_BIN
            del env["SLURM_CONF"]
        with open(self.watch_log, "wb") as log:
            self.watcher = subprocess.Popen(
                [PYTHON, "-m", "formula_foundry.sync", "watch", "--interval", "1"],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_watcher(self) -> None:
        """SIGTERM: the pass finishes, then the watcher must exit 0 having quarantined nothing."""
        proc, self.watcher = self.watcher, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log = self.watch_log.read_text()
        assert proc.returncode == 0, f"ff-sync watch exited {proc.returncode}:\n{log}"
        assert "quarantined" not in log.replace(" 0 quarantined", ""), log

    def run(self, run_id: str) -> dict[str, Any] | None:
        """The store's run of a spool run id (as ``snapshot`` shows a run), None if absent;
        never more than one."""
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        from formula_foundry.sync.mlflow.snapshot import _run

        if not self.db.exists():
            return None
        client = MlflowClient(tracking_uri=self.uri)
        names = {e.experiment_id: e.name for e in client.search_experiments(ViewType.ALL)}
        found = client.search_runs(
            sorted(names), f"tags.`ff.run_uuid` = '{run_id}'", run_view_type=ViewType.ALL
        )
        assert len(found) <= 1, f"{len(found)} MLflow runs for {run_id}"
        return _run(client, found[0], names, {}, False) if found else None

    def wait_run(
        self,
        run_id: str,
        status: str,
        job_id: str | None,
        timeout: float = SYNC_TIMEOUT_S,
        loss_steps: list[int] | None = None,
        until: Callable[[dict[str, Any]], bool] | None = None,
        never: str | None = None,
    ) -> dict[str, Any]:
        """Wait until the watcher has synced the run with ``status`` (and these ``loss`` steps,
        and ``until(run)``); return the run. Fail at once if it shows status ``never``."""
        seen: list[Any] = [None]

        def synced() -> bool:
            if self.watcher is None or self.watcher.poll() is not None:
                raise SlurmError(f"ff-sync watch is gone:\n{tail(self.watch_log)}")
            try:
                seen[0] = self.run(run_id)
            except Exception as exc:  # the store busy with the watcher's pass: poll again
                seen[0] = exc
                return False
            if isinstance(seen[0], dict) and seen[0]["status"] == never:
                raise SlurmError(f"run {run_id} is {never}: {seen[0]!r}")
            if not isinstance(seen[0], dict) or seen[0]["status"] != status:
                return False
            if loss_steps is not None and steps(seen[0]) != loss_steps:
                return False
            return until is None or until(seen[0])

        try:
            self.slurm.wait_for(synced, timeout, f"run {run_id} {status}", job_id)
        except SlurmError as exc:
            raise SlurmError(
                f"{exc}\nlast seen: {seen[0]!r}\n--- ff-sync watch log tail:\n"
                f"{tail(self.watch_log)}\n--- job output:\n"
                f"{brief(self.output(job_id)) if job_id else ''}"
            ) from None
        assert isinstance(seen[0], dict)
        return seen[0]


def has_reason(reason: str | None) -> Callable[[dict[str, Any]], bool]:
    """``wait_run(until=...)``: the run carries its own end reason. The watcher may first end
    it on the scheduler's word ("slurm job N CANCELLED": the job ended after the pass read
    the spool, before the tracker's end event landed); its next pass replays the end event,
    whose reason replaces the sync's. Both are the run ending KILLED."""
    return lambda run: run["tags"].get("ff.sync.end_reason") == reason


def assert_ends(project: Project, run_id: str, job_id: str, ends: list[str]) -> None:
    """The run's end events in the spool are ``ends``."""
    found = project.ends(run_id)
    assert found == ends, (
        f"run {run_id}: end events {found}, expected {ends}. Job {job_id} took "
        f"{project.slurm.job(job_id).get('RunTime')} (a Python that does not finish its SIGTERM "
        f"handler is SIGKILLed after KillWait); its output:\n{brief(project.output(job_id))}"
    )


def brief(output: str) -> str:
    """A job's output without all but the last of its ``returned N`` lines."""
    lines = output.splitlines()
    returned = [line for line in lines if line.startswith("returned ")]
    kept = [line for line in lines if not line.startswith("returned ")]
    return "\n".join(
        kept + ([f"({len(returned)} returned lines, the last: {returned[-1]})"] if returned else [])
    )


def steps(run: dict[str, Any], key: str = "loss") -> list[int]:
    return [point[0] for point in run["metrics"].get(key, [])]


def returned_steps(output: str) -> list[int]:
    """The steps whose log_metric call returned (the script prints after each)."""
    return [int(line.split()[1]) for line in output.splitlines() if line.startswith("returned ")]


def segment_pid(seg: Path) -> int:
    """``seg-<ms>-<host>-<pid>-<random>.jsonl`` → pid."""
    return int(seg.name.removesuffix(".jsonl").rsplit("-", 2)[1])


def listpids(slurm: Slurm, job_id: str) -> list[int]:
    out = slurm.run("scontrol", "listpids", job_id)
    return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()]


@dataclass
class LongJobs:
    notice: str
    limit: str


@pytest.fixture(scope="module")
def site(slurm: Slurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """One submit folder for most of the module's jobs, synced by ``ff-sync watch`` all along."""
    site = Project(tmp_path_factory.mktemp("site"), slurm).setup()
    site.start_watcher()
    try:
        yield site
    finally:
        site.stop_watcher()


@pytest.fixture(scope="module")
def silent(slurm: Slurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A project whose watcher cannot ask Slurm (no Slurm commands on its PATH) and ends runs
    after SILENCE_S of silence. Started with the module, with one finished run to sync, so that
    it has imported MLflow and created its store before its test needs a pass within seconds."""
    silent = Project(tmp_path_factory.mktemp("silent"), slurm, SILENCE_S, scheduler=False)
    silent.setup()
    warm_up = "from formula_foundry.tracking import get_tracker\n" + (
        "get_tracker().start_run(run_name='warm-up', run_id='warm-up').end()"
    )
    env = {**silent.base_env(), "FF_SPOOL_ROOT": str(silent.spool)}
    subprocess.run([PYTHON, "-c", warm_up], cwd=silent.root, env=env, check=True, timeout=60)
    silent.start_watcher()
    try:
        yield silent
    finally:
        silent.stop_watcher()


@pytest.fixture(scope="module", autouse=True)
def long_jobs(site: Project, silent: Project) -> LongJobs:
    """The time-limit jobs (a minute or more each), submitted before the other tests run."""
    # --signal=B:TERM@50: the recipe's notice, sent to the batch shell once at most 50 s are
    # left (Slurm checks every 30 s): after 10-40 s of this 1-minute job.
    notice = site.submit("--time=1", "--signal=B:TERM@50", args=("--then", "forever"))
    # The same job without a useful notice (SIGCONT to the shell is a no-op): it runs into its
    # limit, where Slurm sends SIGTERM to every process of the job (then SIGKILL after KillWait).
    limit = site.submit("--time=1", "--signal=B:CONT@1", args=("--then", "forever"))
    return LongJobs(notice, limit)


# -- the tests ---------------------------------------------------------------------------------


def test_requeued_job_continues_one_run(slurm: Slurm, site: Project) -> None:
    """scontrol requeue: the job restarts with the same job id, so the recipe's FF_RUN_ID
    resumes the run; one MLflow run holds both executions' steps and ends FINISHED. The watcher
    syncs the first execution's KILLED end meanwhile; the restart makes the run RUNNING, then
    FINISHED."""
    job = site.submit(args=("--steps", "4", "--then", "hold-once"))
    run_id = f"coupon-sweep-{job}"
    site.wait_mark(f"{job}-0.ready", job)
    slurm.run("scontrol", "requeue", job)
    requeued_at = time.time()
    # Requeued: the job's processes got SIGTERM and the job waits for its BeginTime.
    slurm.wait_state(job, "PENDING", JOB_TIMEOUT_S)
    assert_ends(site, run_id, job, ["KILLED"])
    run = site.wait_run(run_id, "KILLED", job)
    assert steps(run) == [0, 1, 2, 3]

    # Slurm revokes the job's credential at the requeue, to the second: a restart in that same
    # second is killed ("Job credential revoked") and the job ends FAILED. Start it later.
    time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    slurm.wait_state(job, "COMPLETED", JOB_TIMEOUT_S)
    assert slurm.job(job)["Restarts"] == "1"
    out = site.output(job)
    assert f"run {run_id} restart 0" in out and f"run {run_id} restart 1" in out, out
    assert site.ends(run_id) == ["KILLED", "FINISHED"]
    assert len(site.segments(run_id)) == 2

    run = site.wait_run(run_id, "FINISHED", job)
    assert steps(run) == list(range(8))
    assert run["name"] == f"job-{job}"
    # The job's facts, tagged by the tracker from Slurm's variables (the second execution's).
    facts = {k: v for k, v in run["tags"].items() if k.startswith("slurm.")}
    assert facts["slurm.restart_count"] == "1"
    assert facts["slurm.job_id"] == job and facts["slurm.partition"] == "main"
    assert facts["slurm.cluster"] == "ff-test" and facts["slurm.nodelist"] == slurm.host
    assert facts["slurm.job_name"] == "coupon-sweep"
    assert run["params"] == {"steps_per_execution": "4"}
    # The first execution ended on the requeue's SIGTERM; the reason went with that end.
    assert re.fullmatch(FOUR_HOURS_LEFT % job, str(site.reasons(run_id)[0])), site.reasons(run_id)
    assert "ff.sync.end_reason" not in run["tags"]


def test_scancel_ends_run_killed(slurm: Slurm, site: Project) -> None:
    """scancel: Slurm sends SIGTERM to the job's processes; the tracker ends the run KILLED."""
    job = site.submit(args=("--steps", "5", "--then", "hold"))
    run_id = f"coupon-sweep-{job}"
    site.wait_mark(f"{job}-0.ready", job)
    slurm.run("scancel", job)
    slurm.wait_state(job, "CANCELLED", JOB_TIMEOUT_S)
    assert_ends(site, run_id, job, ["KILLED"])
    # The reason: the signal, the job and what was left of the recipe's --time=04:00:00.
    (reason,) = site.reasons(run_id)
    assert re.fullmatch(FOUR_HOURS_LEFT % job, str(reason)), reason
    run = site.wait_run(run_id, "KILLED", job, until=has_reason(reason))
    assert steps(run) == list(range(5))
    assert run["end_time"] is not None


def test_batch_shell_waits_for_the_end_event(slurm: Slurm, site: Project) -> None:
    """The notice (what --signal=B:TERM@N sends; here at once with ``scancel --batch``) reaches
    only the batch shell, which forwards it to Python. The job must last until Python has
    ended its run: Slurm kills what is left of a job when its script exits. The training
    script's own handler takes 2 s (a checkpoint) before ending the run KILLED."""
    job = site.submit(args=("--steps", "3", "--then", "hold", "--checkpoint-s", "2"))
    run_id = f"coupon-sweep-{job}"
    site.wait_mark(f"{job}-0.ready", job)
    slurm.run("scancel", "--batch", "--signal=TERM", job)
    state = slurm.wait_state(job, ("FAILED", "COMPLETED", "CANCELLED"), JOB_TIMEOUT_S)
    # At the moment Slurm says the job is over, the run's end event is in the spool.
    assert_ends(site, run_id, job, ["KILLED"])
    assert (state, slurm.job(job)["ExitCode"]) == ("FAILED", "143:0")
    assert "checkpointed and ended" in site.output(job)
    run = site.wait_run(run_id, "KILLED", job)
    assert steps(run) == [0, 1, 2]


def test_job_array_one_run_per_task(slurm: Slurm, site: Project) -> None:
    """--array=0-3: four runs, one per task (the recipe's FF_RUN_ID names the task as squeue
    does, <array job id>_<task id>), named and tagged by task, none merged."""
    array = site.submit("--array=0-3", args=("--steps", "3"))
    records: list[dict[str, str]] = []

    def done() -> bool:
        records[:] = slurm.jobs(array)
        return len(records) == 4 and all(r.get("JobState") == "COMPLETED" for r in records)

    slurm.wait_for(done, JOB_TIMEOUT_S, f"the 4 tasks of array {array} to complete", array)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    job_of = {r["ArrayTaskId"]: r["JobId"] for r in records}
    assert len(set(job_of.values())) == 4

    for task in range(4):
        run = site.wait_run(f"coupon-sweep-{array}_{task}", "FINISHED", f"{array}_{task}")
        assert run["name"] == f"task-{task}"
        assert steps(run) == [0, 1, 2]
        assert run["tags"]["slurm.array_task_id"] == str(task)
        assert run["tags"]["slurm.array_job_id"] == array
        assert run["tags"]["slurm.job_id"] == job_of[str(task)]
        # None merged: each task's run has one segment, written by that task alone.
        assert len(site.segments(f"coupon-sweep-{array}_{task}")) == 1
    # The array's own id is also one of its tasks' job ids: no run is named after it.
    assert site.run(f"coupon-sweep-{array}") is None


def test_multi_task_step_ranks_attach_to_one_run(slurm: Slurm, site: Project) -> None:
    """``srun --ntasks=2`` inside the job: the job's process starts the run, each rank logs
    into it through attach_run; one MLflow run, every process a segment of its own."""
    job = site.submit("--ntasks=2", args=("--steps", "2", "--then", "ranks"))
    run_id = f"coupon-sweep-{job}"
    state = slurm.wait_state(job, ("COMPLETED", "FAILED"), JOB_TIMEOUT_S)
    out = site.output(job)
    assert state == "COMPLETED", out
    rank_pids = {
        int(line.split()[1]): int(line.split()[3])
        for line in out.splitlines()
        if line.startswith("rank ")
    }
    assert sorted(rank_pids) == [0, 1], out
    driver_pid = int(out.split(" pid ", 1)[1].split()[0])

    # A pass that began while the ranks ran may sync the end event (the driver's segment) with
    # part of the ranks' segments; the next pass brings the rest.
    run = site.wait_run(run_id, "FINISHED", job, until=lambda r: len(r["params"]) == 3)
    assert steps(run) == [0, 1]
    assert steps(run, "rank0.loss") == steps(run, "rank1.loss") == [0, 1, 2, 3, 4]
    assert run["params"] == {
        "steps_per_execution": "2",
        "rank0.pid": str(rank_pids[0]),
        "rank1.pid": str(rank_pids[1]),
    }
    # No segment shared: three segments, one per process, each holding only its own metrics.
    writers: dict[int, set[str]] = {}
    for seg, event in site.events(run_id):
        if event.kind == "metrics":
            writers.setdefault(segment_pid(seg), set()).update(event.data["d"])
    assert len(site.segments(run_id)) == 3
    assert writers == {
        driver_pid: {"loss"},
        rank_pids[0]: {"rank0.loss"},
        rank_pids[1]: {"rank1.loss"},
    }
    assert site.ends(run_id) == ["FINISHED"]


def _check_time_limit_run(site: Project, job: str, left_s: tuple[int, int] | None) -> None:
    """The run ended KILLED with every returned call synced; its reason names the job and
    how much of its 1-minute limit was left when SIGTERM came (``left_s``, seconds), or that
    the limit was reached (``None``)."""
    run_id = f"coupon-sweep-{job}"
    out = site.output(job)
    assert_ends(site, run_id, job, ["KILLED"])
    (reason,) = site.reasons(run_id)
    if left_s is None:
        assert reason == f"SIGTERM in Slurm job {job}, its time limit reached"
    else:
        left = rf"SIGTERM in Slurm job {job}, 0:(\d\d) of its time limit left"
        found = re.fullmatch(left, str(reason))
        assert found and left_s[0] <= int(found[1]) <= left_s[1], reason
    run = site.wait_run(run_id, "KILLED", job, until=has_reason(reason))
    # Every call that returned is synced; nothing is missing in between.
    returned = returned_steps(out)
    synced = steps(run)
    assert returned and synced == list(range(len(synced))), brief(out)
    assert set(returned) <= set(synced) and len(synced) <= len(returned) + 1


def test_time_limit_notice_ends_run_killed(
    slurm: Slurm, site: Project, long_jobs: LongJobs
) -> None:
    """--signal=B:TERM@50 with --time=1: the batch shell gets SIGTERM before the limit and
    forwards it; the tracker ends the run KILLED; every returned log call is synced. The job
    ends on the notice, before its limit: Slurm reports it FAILED (exit 143), not TIMEOUT."""
    job = long_jobs.notice
    state = slurm.wait_state(job, ("FAILED", "TIMEOUT", "COMPLETED"), TIME_LIMIT_TIMEOUT_S)
    assert (state, slurm.job(job)["ExitCode"]) == ("FAILED", "143:0")
    _check_time_limit_run(site, job, (1, 50))  # the notice: at most 50 s left


def test_jobs_dead_without_end_event_stay_open_until_stale(slurm: Slurm, silent: Project) -> None:
    """Two jobs that leave no end event: one SIGKILLed (every pid of ``scontrol listpids``),
    one that completes (exit 0) without ending its run. Synced from a host without Slurm's
    commands, only the silence rule ends them: the watcher's passes show both runs RUNNING with
    every step; once ``sync.stale_after_s`` (20 s in this project's config) of silence has
    passed, a pass ends them KILLED at their last sign of life."""
    silent.wait_run("warm-up", "FINISHED", None)  # the watcher is up, MLflow imported
    killed = silent.submit(args=("--steps", "4", "--then", "hold"))
    killed_run = f"coupon-sweep-{killed}"
    silent.wait_mark(f"{killed}-0.ready", killed)
    pids = listpids(slurm, killed)
    assert len(pids) >= 2, pids  # the batch shell and Python
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    completed = silent.submit(args=("--steps", "4", "--then", "exit-without-end"))
    completed_run = f"coupon-sweep-{completed}"
    assert slurm.wait_state(killed, ("FAILED", "CANCELLED"), JOB_TIMEOUT_S) == "FAILED"
    assert slurm.job(killed)["ExitCode"] == "0:9"
    assert slurm.wait_state(completed, ("COMPLETED", "FAILED"), JOB_TIMEOUT_S) == "COMPLETED"
    runs = (killed_run, completed_run)
    assert [silent.ends(r) for r in runs] == [[], []]
    last_t = {r: max(e.t for _, e in silent.events(r)) for r in runs}

    # Synced, and still RUNNING while silent for less than stale_after_s.
    for run_id in runs:
        run = silent.wait_run(run_id, "RUNNING", None, loss_steps=[0, 1, 2, 3], never="KILLED")
        assert time.time() * 1000 < last_t[run_id] + SILENCE_S * 1000, (
            f"{run_id}: seen only after stale_after_s; a machine this slow needs a larger SILENCE_S"
        )
        assert run["end_time"] is None

    for run_id in runs:
        run = silent.wait_run(run_id, "KILLED", None, timeout=SILENCE_S + SYNC_TIMEOUT_S)
        # Not before stale_after_s of silence; ended at the last sign of life.
        assert time.time() * 1000 >= last_t[run_id] + SILENCE_S * 1000
        assert run["end_time"] == last_t[run_id]
        assert steps(run) == [0, 1, 2, 3]
    # The pass reports what it ended once it is done (after the store has the change).
    try:
        silent.slurm.wait_for(
            lambda: all(
                f"run {r}: no sign of life since" in silent.watch_log.read_text() for r in runs
            ),
            30,
            "the watcher to report both runs ended",
        )
    except SlurmError as exc:
        raise SlurmError(f"{exc}\n--- ff-sync watch log:\n{tail(silent.watch_log)}") from None


def test_time_limit_reached_ends_run_killed(
    slurm: Slurm, site: Project, long_jobs: LongJobs
) -> None:
    """A job still running at its limit (its notice is a no-op SIGCONT): Slurm sends SIGTERM to
    every process of the job, the tracker ends the run KILLED; Slurm reports TIMEOUT."""
    job = long_jobs.limit
    state = slurm.wait_state(job, ("FAILED", "TIMEOUT", "COMPLETED"), TIME_LIMIT_TIMEOUT_S)
    assert state == "TIMEOUT"
    _check_time_limit_run(site, job, None)


def test_preempted_job_continues_one_run(slurm: Slurm, site: Project) -> None:
    """Preemption: a job of the preemptable partition `scavenger` holds the whole node; a job of
    `urgent` (a higher PriorityTier) needs a core, so Slurm requeues the first job (SIGTERM;
    the recipe's --requeue). Its run ends KILLED with the reason; requeued, the job continues
    the one run to FINISHED with every step. Last in the module: the exclusive job waits for
    the node to be free of the other tests' jobs."""
    job = site.submit(
        "--partition=scavenger", "--exclusive", args=("--steps", "4", "--then", "hold-once")
    )
    run_id = f"coupon-sweep-{job}"
    site.wait_mark(f"{job}-0.ready", job, timeout=TIME_LIMIT_TIMEOUT_S)
    urgent = slurm.sbatch(
        "--partition=urgent",
        f"--output={site.root / 'urgent-%j.out'}",
        "--wrap=sleep 1",
        cwd=site.root,
    )
    slurm.wait_state(urgent, "COMPLETED", JOB_TIMEOUT_S)
    assert slurm.wait_state(job, "PENDING", JOB_TIMEOUT_S) == "PENDING"
    requeued_at = time.time()  # by now at the latest
    assert slurm.job(job).get("Reason") in ("BeginTime", "Priority", "Resources", "None"), (
        slurm.job(job)
    )
    assert_ends(site, run_id, job, ["KILLED"])
    (reason,) = site.reasons(run_id)
    assert re.fullmatch(FOUR_HOURS_LEFT % job, str(reason)), reason
    run = site.wait_run(run_id, "KILLED", job, until=has_reason(reason))
    assert steps(run) == [0, 1, 2, 3]

    # Slurm revokes the job's credential at the requeue, to the second: a restart in that same
    # second is killed ("Job credential revoked") and the job ends FAILED. Start it later.
    time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    slurm.wait_state(job, "COMPLETED", JOB_TIMEOUT_S)
    assert slurm.job(job)["Restarts"] == "1"
    assert site.ends(run_id) == ["KILLED", "FINISHED"]
    run = site.wait_run(run_id, "FINISHED", job)
    assert steps(run) == list(range(8))
    assert "ff.sync.end_reason" not in run["tags"]
