"""Fixtures of the drop-in tests: run unmodified MLflow scripts, sync their spools, compare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._proc import child_env as base_child_env

# MLflow variables a developer's shell may set that change where a script logs.
MLFLOW_ENV_VARS = (
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_REGISTRY_URI",
)
SCRIPT = "script.py"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ours minus configuration variables, plus ``extra``."""
    env = {k: v for k, v in base_child_env().items() if k not in MLFLOW_ENV_VARS}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def run_script(
    code: str,
    cwd: Path,
    tracking_uri: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    *,
    args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) as ``script.py`` in ``cwd`` with MLFLOW_TRACKING_URI set.

    The script is started as ``python script.py`` from ``cwd``, as a user would: MLflow's
    ``mlflow.source.name`` tag is then ``script.py`` whichever folder the script runs in."""
    script = cwd / SCRIPT
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        env=child_env({"MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def ff_sync(
    spool: Path, db: Path, *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ff-sync [args]`` replaying ``spool`` into the SQLite store ``db``."""
    proc = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync", *args],
        cwd=cwd or db.parent,
        env=child_env({"FF_SPOOL_ROOT": str(spool), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ff-sync {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def dropin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two working folders: ``direct`` (a script logs into SQLite) and ``spooled``."""
    direct, spooled = tmp_path / "direct", tmp_path / "spooled"
    direct.mkdir()
    spooled.mkdir()
    return direct, spooled


def direct_uri(direct: Path) -> str:
    """The tracking URI of the ``direct`` way: MLflow's own SQLite store."""
    return f"sqlite:///{direct / 'direct.db'}"


def spool_uri(spooled: Path) -> str:
    """The tracking URI of the ``spooled`` way: a spool inside ``spooled``."""
    return f"spool://{(spooled / 'spool').as_posix()}"


def run_both(
    code: str,
    direct: Path,
    spooled: Path,
    env: Mapping[str, str] | None = None,
    *,
    env_spooled: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    check: bool = True,
    timeout: float = 180,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run the same script both ways at once (two processes): into ``direct/direct.db`` and
    into ``spooled/spool``. ``env_spooled`` replaces ``env`` for the spooled process (a run id
    differs between the ways). Returns (direct, spooled)."""
    with ThreadPoolExecutor(2) as pool:
        fd = pool.submit(
            run_script, code, direct, direct_uri(direct), env, timeout, check, args=args
        )
        fs = pool.submit(
            run_script,
            code,
            spooled,
            spool_uri(spooled),
            env if env_spooled is None else env_spooled,
            timeout,
            check,
            args=args,
        )
        return fd.result(), fs.result()


# -- a fork server: children that start with MLflow already imported ------------------------------

_ZYGOTE = r"""
import atexit, json, os, runpy, signal, sys, threading, time, traceback

# What every child imports first: MLflow's client and SQLite store, the spool plugin, the
# sync. Imported once here; each child is a fork of this process, as fresh as a new one.
import mlflow
import mlflow.store.tracking.sqlalchemy_store
import formula_foundry.dropin.store
import formula_foundry.sync.commands.cli
try:
    import git  # MLflow reads the script's git commit with GitPython: a second per process
except ImportError:
    pass

W = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def child(req):
    os.setpgid(0, 0)
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], W),
                                (2, req["err"], W)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = list(req["argv"])
        sys.path[0] = req["cwd"]
        if req.get("module"):
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(req["argv"][0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    # What the interpreter does at exit, in its order: wait for non-daemon threads, run the
    # atexit handlers (MLflow ends its active run there), flush stdio. Then leave without
    # tearing down two thousand modules one by one (seconds, and nothing a script sees).
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.005)


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


reply({"threads": threading.active_count()})
while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    if "wait" in req:
        rc, timed_out = wait(req["wait"], req["timeout"])
        reply({"rc": rc, "timed_out": timed_out})
        continue
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    reply({"pid": pid})
"""


@dataclass
class _Child:
    argv: list[str]
    pid: int
    out: Path
    err: Path


class Zygote:
    """A Python process that imported MLflow, the plugin and the sync once and forks a child
    for each script (or ``ff-sync``) to run: a child is a new process with its own
    environment, folder, argv and stdio, that exits as a script does (atexit handlers run),
    without paying MLflow's import again (seconds on a busy machine, per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._n = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(folder / "zygote.err").open("w"),
            cwd=folder,
            env=child_env(),
            text=True,
        )
        ready = self._ask(None)
        # A fork copies only the forking thread: the zygote must have no other.
        assert ready == {"threads": 1}, ready

    def _ask(self, request: Mapping[str, object] | None) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = (self.folder / "zygote.err").read_text()
            raise AssertionError(f"the zygote died:\n{err}")
        answer: dict[str, object] = json.loads(line)
        return answer

    def start(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], module: str | None = None
    ) -> _Child:
        self._n += 1
        out, err = self.folder / f"{self._n}.out", self.folder / f"{self._n}.err"
        request = {
            "argv": list(argv),
            "cwd": str(cwd),
            "env": dict(env),
            "out": str(out),
            "err": str(err),
            "module": module,
        }
        pid = self._ask(request)["pid"]
        assert isinstance(pid, int)
        return _Child(list(argv), pid, out, err)

    def wait(self, child: _Child, timeout: float) -> subprocess.CompletedProcess[str]:
        answer = self._ask({"wait": child.pid, "timeout": timeout})
        rc = answer["rc"]
        assert isinstance(rc, int)
        out = child.out.read_text(encoding="utf-8", errors="replace")
        err = child.err.read_text(encoding="utf-8", errors="replace")
        if answer["timed_out"]:
            raise AssertionError(f"{child.argv} took more than {timeout} s:\n{out}\n{err}")
        return subprocess.CompletedProcess(child.argv, rc, out, err)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One fork server for the session's drop-in scripts."""
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    try:
        yield z
    finally:
        z.close()


@dataclass
class Ways:
    """One script, two ways, under ``root``: ``direct/`` logs into ``direct/direct.db``;
    ``spooled/`` logs into ``spooled/spool``, which ``sync`` replays into ``synced.db``.

    With a ``zygote`` the scripts and ``ff-sync`` run as its forked children; without, as
    new Python processes (``run_script``, ``ff_sync``)."""

    root: Path
    zygote: Zygote | None = None
    timeout: float = 300

    def __post_init__(self) -> None:
        self.direct.mkdir(parents=True, exist_ok=True)
        self.spooled.mkdir(parents=True, exist_ok=True)

    @property
    def direct(self) -> Path:
        return self.root / "direct"

    @property
    def spooled(self) -> Path:
        return self.root / "spooled"

    @property
    def spool(self) -> Path:
        return self.spooled / "spool"

    @property
    def direct_db(self) -> Path:
        return self.direct / "direct.db"

    @property
    def synced_db(self) -> Path:
        return self.root / "synced.db"

    def start_from(self, template: Path) -> None:
        """Start both stores as copies of an empty, migrated store (saves MLflow's migration
        in each process; the content is that of a fresh store)."""
        shutil.copyfile(template, self.direct_db)
        shutil.copyfile(template, self.synced_db)

    def run(
        self,
        code: str,
        env: Mapping[str, str] | None = None,
        *,
        env_spooled: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        check: bool = True,
    ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        """Run ``code`` both ways at once; returns (direct, spooled)."""
        if self.zygote is None:
            return run_both(
                code,
                self.direct,
                self.spooled,
                env,
                env_spooled=env_spooled,
                args=args,
                check=check,
                timeout=self.timeout,
            )
        z = self.zygote
        children = []
        for cwd, uri, extra in (
            (self.direct, direct_uri(self.direct), env),
            (self.spooled, spool_uri(self.spooled), env if env_spooled is None else env_spooled),
        ):
            (cwd / SCRIPT).write_text(textwrap.dedent(code), encoding="utf-8")
            child = child_env({"MLFLOW_TRACKING_URI": uri, **(extra or {})})
            children.append(z.start([SCRIPT, *args], cwd, child))
        done = [z.wait(c, self.timeout) for c in children]
        for way, proc in zip(("direct", "spooled"), done, strict=True):
            if check and proc.returncode != 0:
                raise AssertionError(
                    f"{way} script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                )
        return done[0], done[1]

    def sync(self, *args: str) -> subprocess.CompletedProcess[str]:
        """ff-sync the spool into ``synced.db``."""
        if self.zygote is None:
            return ff_sync(self.spool, self.synced_db, *args, cwd=self.root)
        env = child_env(
            {"FF_SPOOL_ROOT": str(self.spool), "MLFLOW_TRACKING_URI": f"sqlite:///{self.synced_db}"}
        )
        child = self.zygote.start(["ff-sync", *args], self.root, env, module="formula_foundry.sync")
        proc = self.zygote.wait(child, self.timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"ff-sync {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


@pytest.fixture
def ways(dropin_dirs: tuple[Path, Path]) -> Ways:
    """The two ways under this test's tmp_path (``direct`` and ``spooled`` as dropin_dirs), as
    new Python processes (``python script.py``, ``python -m formula_foundry.sync``); each
    store is created by the process that first opens it (unless ``start_from``)."""
    return Ways(dropin_dirs[0].parent)


@pytest.fixture
def forked_ways(dropin_dirs: tuple[Path, Path], zygote: Zygote, empty_store: Path) -> Ways:
    """As ``ways``, but the scripts and ff-sync run as children of the session's zygote, and
    both stores start as copies of ``empty_store``: a second or two per script instead of
    MLflow's import and migration in every process (tens of seconds on a busy machine)."""
    w = Ways(dropin_dirs[0].parent, zygote)
    w.start_from(empty_store)
    return w


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once by MLflow in a child process."""
    folder = tmp_path_factory.mktemp("empty-store")
    db = folder / "empty.db"
    code = (
        "from mlflow import MlflowClient\n"
        f"MlflowClient({f'sqlite:///{db}'!r}).search_experiments()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return db


RunScript = Callable[..., subprocess.CompletedProcess[str]]
