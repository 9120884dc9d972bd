"""System metrics of a run: a background thread samples the host and the job's GPUs.

``start_run(log_system_metrics=True)`` (or ``FF_SYSTEM_METRICS=1``, or
``tracking.system_metrics: true``) starts one :class:`SystemSampler` for the run. Every
``interval_s`` it reads the host (:mod:`~formula_foundry.tracking.host_metrics`) and the job's
GPUs (:mod:`~formula_foundry.tracking.gpus`) — holding no lock while it reads — and logs the
readings with one ``log_metrics`` call under MLflow's names, at steps 0, 1, 2, ... as MLflow's
monitor numbers them. Ending the run (normally, on an exception, at exit or on SIGTERM) stops
the sampler, which logs the last, partial window before the ``run_end`` event is written.

psutil and NVML are loaded by the sampler's thread, never by ``import formula_foundry.tracking``
nor on the ``log_*`` path. A missing one costs its metrics and one warning per process; the
run goes on. Names (docs/observability.md)::

    system/<metric>              the run's only sampling process
    system/<node>/<metric>       FF_SYSTEM_METRICS_NODE (or tracking.system_metrics_node) set,
                                 or one of several processes of a run (an attached worker, a
                                 job of several tasks or nodes): <node> = <host>-rank<N>, or
                                 <host>-pid<P> when no rank variable is set
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from formula_foundry.errors import RunStateError
from formula_foundry.quiet_threads import start_quietly
from formula_foundry.tracking.gpus import GpuReader, open_gpus
from formula_foundry.tracking.host_metrics import HostReader, load_psutil
from formula_foundry.tracking.spool_writer import hostname, now_ms
from formula_foundry.tracking.system_steps import next_step

if TYPE_CHECKING:
    from formula_foundry.config import Settings
    from formula_foundry.tracking.run import Run

PREFIX: Final = "system/"
# A process's rank in its job, from the launchers' variables (srun, torchrun, PMI, Open MPI).
RANK_VARS: Final = ("SLURM_PROCID", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
# More than one task or node in the job: its processes may all log into one run.
SIZE_VARS: Final = ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "WORLD_SIZE")
# A last window shorter than this holds no CPU reading (the kernel counts CPU time in ticks of
# 10 ms or so): at the end, a shorter window is not logged.
MIN_WINDOW_S: Final = 0.1
# How long ending a run waits for the sampler's last window. NVML can hang on a sick GPU; the
# run_end event must not wait for it forever.
STOP_TIMEOUT_S: Final = 10.0
_NOT_KEY_CHAR = re.compile(r"[^\w.\- :]")

_logger = logging.getLogger(__name__)
_warned: set[str] = set()
_warned_lock = threading.Lock()

# Logs one window: (metrics, step, timestamp in ms) -> Run.log_metrics.
LogFn = Callable[[dict[str, float], int, int], None]


def metric_prefix(node: str | None, attached: bool, environ: Mapping[str, str]) -> str:
    """``system/`` or ``system/<node>/`` for this process (rules: the module docstring)."""
    if node:
        return f"{PREFIX}{node}/"
    if not attached and not _several_processes(environ):
        return PREFIX
    host = _NOT_KEY_CHAR.sub("_", hostname().split(".")[0]) or "host"
    for var in RANK_VARS:
        rank = environ.get(var, "")
        if rank.isascii() and rank.isdigit():
            return f"{PREFIX}{host}-rank{int(rank)}/"
    return f"{PREFIX}{host}-pid{os.getpid()}/"


def _several_processes(environ: Mapping[str, str]) -> bool:
    for var in SIZE_VARS:
        value = environ.get(var, "")
        if value.isascii() and value.isdigit() and int(value) > 1:
            return True
    return False


def warn_once(topic: str, message: str) -> None:
    """Log ``message`` as a warning, once per ``topic`` and process."""
    with _warned_lock:
        if topic in _warned:
            return
        _warned.add(topic)
    _logger.warning("formula-foundry system metrics: %s", message)


class SystemSampler:
    """The thread that samples one run. :meth:`stop` logs the last window and returns."""

    def __init__(
        self,
        log: LogFn,
        interval_s: float,
        prefix: str,
        *,
        earlier: tuple[Path, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._log = log
        self.interval_s = interval_s
        self.prefix = prefix
        # A resumed or attached run: (spool root, run id) whose earlier segments may hold
        # this prefix's steps already; ours continue after them, as MLflow's do on resume.
        self._earlier = earlier
        self._environ = dict(os.environ if environ is None else environ)
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._main, name="ff-system-metrics", daemon=True)
        # What sampling costs: CPU seconds of this thread in sample-and-log, and before the
        # first sample (imports, NVML start, the resume scan). Read by tools/bench.
        self.samples = 0
        self.sample_cpu_s = 0.0
        self.startup_cpu_s = 0.0

    def start(self) -> None:
        start_quietly(self._thread.start)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop sampling; wait (``timeout`` at most) until the last window is logged."""
        if os.getpid() != self._pid:
            return  # a forked child: the thread was its parent's
        self._stop.set()
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        started = time.thread_time()
        host, gpus = self._open()
        if host is None and gpus is None:
            return
        try:
            step = 0
            if self._earlier is not None:
                step = next_step(*self._earlier, self.prefix)
            self.startup_cpu_s = time.thread_time() - started
            self._loop(host, gpus, step)
        finally:
            if gpus is not None:
                gpus.close()

    def _open(self) -> tuple[HostReader | None, GpuReader | None]:
        host = None
        try:
            host = HostReader(load_psutil())
        except ImportError:
            warn_once(
                "psutil",
                "psutil is not installed: no CPU, memory, disk or network metrics "
                "(pip install 'formula-foundry[system]'); the run goes on",
            )
        except Exception as exc:  # psutil cannot read this host (a locked-down /proc)
            warn_once("psutil", f"psutil cannot read this host ({exc}); the run goes on")
        gpus, why = None, ""
        try:
            gpus, why = open_gpus(self._environ)
        except Exception as exc:  # NVML misbehaving must never cost the run
            why = f"reading the GPUs failed ({exc}): no GPU metrics"
        if why:
            warn_once("gpu", why + "; the run goes on")
        return host, gpus

    def _loop(self, host: HostReader | None, gpus: GpuReader | None, step: int) -> None:
        interval = self.interval_s
        last = time.monotonic()
        due = last + interval
        while not self._stop.wait(max(due - time.monotonic(), 0.0)):
            if not self._emit(host, gpus, step):
                return
            step += 1
            last = time.monotonic()
            due += interval
            if due <= last:  # fell behind (a suspended process): no burst of catch-up samples
                due = last + interval
        if time.monotonic() - last >= MIN_WINDOW_S:
            self._emit(host, gpus, step)  # the last, partial window

    def _emit(self, host: HostReader | None, gpus: GpuReader | None, step: int) -> bool:
        """Sample, then log in one call; False when the run can take no more."""
        cpu0 = time.thread_time()
        metrics: dict[str, float] = {}
        with contextlib.suppress(Exception):  # a reading that fails is left out this time
            if host is not None:
                metrics.update(host.sample())
        with contextlib.suppress(Exception):
            if gpus is not None:
                metrics.update(gpus.sample())
        go_on = True
        if metrics:
            prefix = self.prefix
            try:
                self._log({prefix + k: v for k, v in metrics.items()}, step, now_ms())
            except RunStateError:
                go_on = False  # ended without waiting for us (the stop timed out)
            except Exception:
                pass  # a full disk: the next window may fit, as for heartbeats
        self.samples += 1
        self.sample_cpu_s += time.thread_time() - cpu0
        return go_on


def sample_run(run: Run, settings: Settings, *, attached: bool, resumed: bool) -> SystemSampler:
    """Start sampling into ``run`` at the configured interval, under this process's names.

    ``resumed``: the run has earlier segments (a resumed or attached run), whose steps ours
    follow.
    """

    def log(metrics: dict[str, float], step: int, t: int) -> None:
        run.log_metrics(metrics, step=step, timestamp=t)

    sampler = SystemSampler(
        log,
        settings.system_metrics_interval_s,
        metric_prefix(settings.system_metrics_node, attached, os.environ),
        earlier=(settings.spool_root, run.run_id) if resumed else None,
    )
    sampler.start()
    return sampler
