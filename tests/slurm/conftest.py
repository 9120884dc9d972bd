"""A throw-away single-node Slurm for the session (marker ``slurm``).

Debian's ``slurm-wlm`` and ``munge`` (``./tools/ci_slurm.sh`` installs them) run here without
anything in ``/etc``: a ``munged`` of our own (its own key and socket), ``slurmctld`` and
``slurmd`` on this host, all configured by one ``slurm.conf`` under a temporary folder (every
client command finds it through ``SLURM_CONF``). When the session ends, the jobs are cancelled,
the daemons stopped by the pids in their pid files, and any process still carrying this
cluster's ``SLURM_CONF`` (a job's orphan) killed by pid. Without the packages, or without root
(``slurmd`` launches jobs as their users), the tests are skipped with the reason, or fail
where ``FF_REQUIRE_SLURM=1`` (``.ci/run`` sets it: CI must really run them).

:class:`Slurm` wraps the commands the tests use (``sbatch``, ``scontrol``, ``scancel``) with
deadlines: every wait fails with ``scontrol show job`` and the daemons' log tails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._services import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun", "munge")
START_TIMEOUT_S = 120.0

# Every path lives under the temporary folder; nothing is read from /etc/slurm.
SLURM_CONF = """\
ClusterName=ff-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule at once (default: at most every 2 s): the tests' jobs are short.
SchedulerParameters=sched_min_interval=100000,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# scontrol show job keeps knowing a finished job (no accounting daemon: sacct does not answer).
MinJobAge=600
# scancel / a time limit: SIGTERM, then SIGKILL after this many seconds.
KillWait=10
InactiveLimit=0
Waittime=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
# The tests' jobs mostly sleep: up to 4 of them share a core, so the long time-limit jobs run
# beside the others (no gang scheduling: shared cores are not time-sliced).
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 \
PriorityTier=1 PreemptMode=OFF
# Preemption: a job of `urgent` (the higher tier) requeues the `scavenger` jobs whose cores it
# needs, as a cluster's high-priority partition does; jobs of `main` are never preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=scavenger Nodes={host} MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


def missing() -> str | None:
    """Why a throw-away Slurm cannot run here, or None."""
    absent = [
        name
        for name in (*DAEMONS, *COMMANDS)
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if absent:
        return (
            f"Slurm/munge not installed (missing {', '.join(absent)}); "
            "run ./tools/ci_slurm.sh (Debian's slurm-wlm and munge)"
        )
    if os.geteuid() != 0:
        return "a throw-away Slurm needs root (slurmd launches jobs as their users)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:])


class SlurmError(AssertionError):
    pass


class Slurm:
    """A single-node Slurm under ``base``; ``env`` is what every client command needs."""

    def __init__(self) -> None:
        # Directly under the temp root (not pytest's private tmp_path): the munge user must be
        # able to reach its own folder.
        self.base = Path(tempfile.mkdtemp(prefix="ff-slurm-"))
        self.base.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.munge_dir = self.base / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in list(self.env):
            # A job's environment (or a developer's shell) must not leak into ours.
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_")) and name != "SLURM_CONF":
                del self.env[name]
        self.pids: dict[str, int] = {}

    # -- daemons ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start_munge()
            self._start_slurm()
            self.wait_for(
                lambda: self.node_state() == "idle",
                START_TIMEOUT_S,
                "the node to be idle",
            )
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        pw = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        self.munge_dir.chmod(0o755)  # root's clients reach the socket
        subprocess.run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                _bin("munged"),
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                "--num-threads=2",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.pids["munged"] = self._read_pid(self.munge_dir / "munged.pid", "munged")

    def _start_slurm(self) -> None:
        (self.base / "state").mkdir()
        (self.base / "spool").mkdir()
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                base=self.base,
                cpus=os.cpu_count() or 1,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
            )
        )
        for daemon in ("slurmctld", "slurmd"):
            # Both daemonise and write their pid files; -i: a fresh state, -f: our conf.
            cmd = [_bin(daemon), "-f", str(self.conf)]
            if daemon == "slurmctld":
                cmd.append("-i")
            result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise SlurmError(
                    f"{daemon} exited {result.returncode}: {result.stderr}\n{self.logs()}"
                )
            self.pids[daemon] = self._read_pid(self.base / f"{daemon}.pid", daemon)

    def _read_pid(self, path: Path, name: str) -> int:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text().strip())
            if time.monotonic() > deadline:
                raise SlurmError(f"{name} wrote no pid file {path}\n{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """End every job, stop the daemons by pid (slurmd, slurmctld, munged; SIGKILL after
        15 s), then SIGKILL any process still carrying this cluster's ``SLURM_CONF`` (a job's
        process that outlived its job: proctrack/linuxproc loses orphans)."""
        if "slurmctld" in self.pids:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--signal=KILL", "--user=root", check=False)
                self.run("scancel", "--user=root", check=False)
                self.wait_for(
                    lambda: not self.run("squeue", "-h", check=False).strip(), 30, "no jobs"
                )
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _terminate(pid)
        for pid in _pids_of(self.conf):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- commands --------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0, **kw: object) -> str:
        result = subprocess.run(
            list(cmd),
            env=kw.pop("env", self.env),  # type: ignore[arg-type]
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[arg-type]
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-o", "%t", check=False).strip()

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit (``sbatch --parsable``) from ``cwd`` with ``env`` (default: ``self.env``, which
        the job inherits as sbatch passes it on); return the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=self.env if env is None else env)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` of one job (or array task, ``N_T``) as a dict."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields: dict[str, str] = {}
        for token in out.split("\n", 1)[0].split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of a job (an array's tasks)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        found = []
        for line in out.splitlines():
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            if fields:
                found.append(fields)
        return found

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "?")

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id is not None:
            parts.append(
                "scontrol show job:\n" + self.run("scontrol", "show", "job", job_id, check=False)
            )
        parts.append("squeue:\n" + self.run("squeue", "-a", check=False))
        parts.append(self.logs())
        return "\n".join(parts)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} log tail:\n{tail(path)}"
            for name, path in (
                ("slurmctld", self.base / "slurmctld.log"),
                ("slurmd", self.base / "slurmd.log"),
                ("munged", self.munge_dir / "munged.log"),
            )
        )

    def wait_for(
        self, cond: Callable[[], object], timeout: float, what: str, job_id: str | None = None
    ) -> object:
        """Poll ``cond`` until it is truthy; fail after ``timeout`` s with the diagnostics."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n"
                    + self.diagnostics(job_id)
                )
            time.sleep(0.25)

    def wait_state(self, job_id: str, states: str | tuple[str, ...], timeout: float) -> str:
        """Wait until the job is in one of ``states``; return that state."""
        wanted = (states,) if isinstance(states, str) else states
        found = self.wait_for(
            lambda: (s := self.state(job_id)) in wanted and s,
            timeout,
            f"job {job_id} to be {'/'.join(wanted)}",
            job_id,
        )
        return str(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our child not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _terminate(pid: int, grace_s: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_of(conf: Path) -> list[int]:
    """Processes of this cluster: daemons, slurmstepd and job processes all inherit
    ``SLURM_CONF=<conf>`` (sbatch passes the submitter's environment on). Never this one."""
    mark = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """One throw-away single-node Slurm per session; skipped when it cannot run here."""
    reason = missing()
    if reason and os.environ.get("FF_REQUIRE_SLURM") == "1":
        pytest.fail(f"FF_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    cluster = Slurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
