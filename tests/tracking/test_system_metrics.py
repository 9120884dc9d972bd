"""System metrics: real psutil samples through a real spool and ff-sync into MLflow, the job's
GPUs chosen from its environment (NVML replaced by a stand-in: the selection is ours), per-node
names, steps across a resume, one warning when psutil or NVML is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from formula_foundry.config import load_settings
from formula_foundry.errors import ConfigError, ValidationError
from formula_foundry.tracking import get_tracker
from formula_foundry.tracking.gpus import (
    GpuReader,
    GpuRequest,
    NvmlError,
    open_gpus,
    requested_gpus,
    select_gpus,
)
from formula_foundry.tracking.host_metrics import HOST_METRICS
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import hostname
from formula_foundry.tracking.system_metrics import metric_prefix

from ._helpers import child_env, run_python, segments

HOST_NAMES = [f"system/{name}" for name in HOST_METRICS]
GPU_NAMES = (
    "memory_usage_percentage",
    "memory_usage_megabytes",
    "utilization_percentage",
    "power_usage_watts",
    "power_usage_percentage",
)


def host_env(**extra: str) -> dict[str, str]:
    """A child's environment that gives it no GPU (``CUDA_VISIBLE_DEVICES=""``), so it logs
    the host's series alone on any machine."""
    return child_env(CUDA_VISIBLE_DEVICES="", **extra)


def nvml_state() -> str:
    """The real NVML here: ``missing`` (no nvidia-ml-py), ``no driver``, or ``works``."""
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]

        pynvml.nvmlInit()
    except ImportError:
        return "missing"
    except Exception:
        return "no driver"
    pynvml.nvmlShutdown()
    return "works"


def spooled(root: Path, run_id: str) -> list[Event]:
    """Every event of the run, segment after segment in the sync's order."""
    out: list[Event] = []
    for seg in segments(root, run_id):
        out.extend(e for e in SegmentReader(seg) if isinstance(e, Event))
    return out


def system_points(events: list[Event]) -> dict[str, list[tuple[int, float]]]:
    """system/... key -> [(step, value)] in spool order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e.kind == "metrics":
            for k, v in e.data["d"].items():
                if k.startswith("system/"):
                    out.setdefault(k, []).append((e.data["step"], v))
    return out


def sync_to_sqlite(project: Path, db: Path) -> dict[str, Any]:
    """ff-sync the project's spool into a fresh SQLite store; return that store's runs."""
    from formula_foundry.sync.mlflow.snapshot import snapshot

    proc = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync"],
        cwd=project,
        env=child_env(
            FF_SPOOL_ROOT=str(project / "data" / "runs"), MLFLOW_TRACKING_URI=f"sqlite:///{db}"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs: dict[str, Any] = snapshot(f"sqlite:///{db}", artifacts=False)["runs"]
    return runs


def check_host_series(metrics: dict[str, list[list[Any]]], prefix: str = "system/") -> int:
    """The eight host series are there, one point per step 0..n-1, with values that are the
    host's; returns n."""
    names = {k for k in metrics if k.startswith("system/")}
    assert names == {prefix + n for n in HOST_METRICS}, sorted(names)
    steps = {k: [p[0] for p in metrics[k]] for k in names}
    n = len(steps[prefix + "cpu_utilization_percentage"])
    assert all(s == list(range(n)) for s in steps.values()), steps
    total_mb = psutil.virtual_memory().total / 1e6
    disk = psutil.disk_usage(os.sep)

    def values(name: str) -> list[float]:
        return [float(p[2]) for p in metrics[prefix + name]]

    assert all(0.0 <= v <= 100.0 for v in values("cpu_utilization_percentage"))
    assert all(0.0 < v <= total_mb for v in values("system_memory_usage_megabytes"))
    for mb, pct in zip(
        values("system_memory_usage_megabytes"),
        values("system_memory_usage_percentage"),
        strict=True,
    ):
        assert abs(mb / total_mb * 100 - pct) < 0.2  # the same reading in two units
    # Other tests and jobs write to this disk meanwhile (GBs at a time), so no sample's used
    # space is what psutil says now; used + free is (the disk's size less its reserve), in MB:
    # a reading in MiB would be 4.9 % less.
    size_mb = (disk.used + disk.free) / 1e6
    used, free = values("disk_usage_megabytes"), values("disk_available_megabytes")
    assert all(abs(u + f - size_mb) < 0.001 * size_mb for u, f in zip(used, free, strict=True))
    for u, f, pct in zip(used, free, values("disk_usage_percentage"), strict=True):
        assert abs(u / (u + f) * 100 - pct) < 0.2  # the same reading in two units
    assert all(v > 0 for v in free)
    assert all(v >= 0 for v in values("network_receive_megabytes"))
    return n


# -- end to end: a real run, real psutil, ff-sync, MLflow --------------------------------------


def test_samples_of_a_run_reach_mlflow_under_mlflows_names(ff_project: Path) -> None:
    run_python(
        """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="sampled", log_system_metrics=True) as run:
            run.log_metric("loss", 0.5)
            time.sleep(1.3)
        """,
        cwd=ff_project,
        env=host_env(FF_SYSTEM_METRICS_INTERVAL_S="0.25"),
    )
    run = sync_to_sqlite(ff_project, ff_project / "synced.db")["sampled"]
    assert run["status"] == "FINISHED"
    # 1.3 s at 0.25 s: about five windows and the last, partial one.
    assert check_host_series(run["metrics"]) >= 3
    # Every point was logged before the run ended.
    stamps = [p[1] for k, pts in run["metrics"].items() if k.startswith("system/") for p in pts]
    assert max(stamps) <= run["end_time"]
    assert run["metrics"]["loss"] == [[0, run["metrics"]["loss"][0][1], "0.5"]]


@pytest.mark.parametrize("how", ["end", "sigterm"])
def test_the_last_partial_window_is_logged_before_the_run_ends(ff_project: Path, how: str) -> None:
    # With a 60 s interval no full window passes: the one sample is the last, partial window.
    ending = "pass" if how == "end" else "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)"
    proc = run_python(
        f"""
        import os, signal, time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="short") as run:
            time.sleep(1.0)
            {ending}
        """,
        cwd=ff_project,
        env=host_env(FF_SYSTEM_METRICS="1", FF_SYSTEM_METRICS_INTERVAL_S="60"),
        check=False,
    )
    assert proc.returncode == (0 if how == "end" else -signal.SIGTERM), proc.stderr
    events = spooled(ff_project / "data" / "runs", "short")
    kinds = [e.kind for e in events]
    assert kinds[-2:] == ["metrics", "run_end"], kinds
    assert set(system_points(events)) == set(HOST_NAMES)
    run = sync_to_sqlite(ff_project, ff_project / "synced.db")["short"]
    assert run["status"] == ("FINISHED" if how == "end" else "KILLED")
    assert check_host_series(run["metrics"]) == 1


def test_a_resumed_run_continues_the_steps_and_an_attached_rank_has_series_of_its_own(
    ff_project: Path,
) -> None:
    start = """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="ddp", log_system_metrics=True) as run:
            time.sleep(0.8)
    """
    env = host_env(FF_SYSTEM_METRICS_INTERVAL_S="0.2", SLURM_NTASKS="2", SLURM_PROCID="0")
    run_python(start, cwd=ff_project, env=env)
    run_python(
        """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().attach_run("ddp", log_system_metrics=True) as run:
            time.sleep(0.5)
        with get_tracker().attach_run("ddp") as run:  # not asked: no sampling
            run.log_metric("rank_loss", 1.0)
        """,
        cwd=ff_project,
        env={**env, "SLURM_PROCID": "1"},
    )
    run_python(start, cwd=ff_project, env=env)  # the requeued job resumes the run
    host = hostname().split(".")[0]
    rank0, rank1 = f"system/{host}-rank0/", f"system/{host}-rank1/"
    points = system_points(spooled(ff_project / "data" / "runs", "ddp"))
    assert set(points) == {rank0 + n for n in HOST_METRICS} | {rank1 + n for n in HOST_METRICS}
    steps = [s for s, _ in points[rank0 + "cpu_utilization_percentage"]]
    assert steps == list(range(len(steps))) and len(steps) >= 4  # both starts, one series
    run = sync_to_sqlite(ff_project, ff_project / "synced.db")["ddp"]
    assert check_host_series(
        {k: v for k, v in run["metrics"].items() if k.startswith(rank0)}, rank0
    ) == len(steps)
    assert (
        check_host_series({k: v for k, v in run["metrics"].items() if k.startswith(rank1)}, rank1)
        >= 1
    )


def test_on_a_gpu_host_the_jobs_gpu_reaches_mlflow(ff_project: Path) -> None:
    if nvml_state() != "works":
        pytest.skip("no NVIDIA GPU here (tools/check_gpu_metrics.py is the check to run on one)")
    run_python(
        """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="gpu", log_system_metrics=True) as run:
            time.sleep(1.2)
        """,
        cwd=ff_project,
        env=child_env(FF_SYSTEM_METRICS_INTERVAL_S="0.5", CUDA_VISIBLE_DEVICES="0"),
    )
    metrics = sync_to_sqlite(ff_project, ff_project / "synced.db")["gpu"]["metrics"]
    gpu = {k for k in metrics if k.startswith("system/gpu_")}
    assert {"system/gpu_0_memory_usage_megabytes", "system/gpu_0_utilization_percentage"} <= gpu
    assert not any(k.startswith("system/gpu_1_") for k in gpu)  # the job's one GPU only


def test_a_node_name_of_ones_own(ff_project: Path) -> None:
    run_python(
        """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="named") as run:
            time.sleep(0.3)
        """,
        cwd=ff_project,
        env=host_env(FF_SYSTEM_METRICS="1", FF_SYSTEM_METRICS_NODE="gpu-node-017"),
    )
    points = system_points(spooled(ff_project / "data" / "runs", "named"))
    assert set(points) == {f"system/gpu-node-017/{n}" for n in HOST_METRICS}


# -- when a run samples: argument > environment > configuration --------------------------------


def _sampled(run_id: str) -> bool:
    root = get_tracker().settings.spool_root
    return bool(system_points(spooled(root, run_id)))


def _quick_run(run_id: str, **kw: Any) -> None:
    import time

    with get_tracker().start_run(run_id=run_id, **kw):
        time.sleep(0.2)


def test_the_argument_wins_over_the_environment_which_wins_over_the_file(
    ff_project: Path, clean_env: pytest.MonkeyPatch, write_config: Any
) -> None:
    write_config(ff_project, "tracking:\n  system_metrics: true\n  system_metrics_interval_s: 5\n")
    assert load_settings().system_metrics_interval_s == 5.0
    _quick_run("file-on")
    _quick_run("arg-off", log_system_metrics=False)
    clean_env.setenv("FF_SYSTEM_METRICS", "0")
    _quick_run("env-off")
    _quick_run("arg-on", log_system_metrics=True)
    assert [_sampled(r) for r in ("file-on", "arg-off", "env-off", "arg-on")] == [
        True,
        False,
        False,
        True,
    ]


def test_off_by_default_and_nested_runs_sample_only_when_asked(
    ff_project: Path, clean_env: pytest.MonkeyPatch
) -> None:
    _quick_run("default")
    clean_env.setenv("FF_SYSTEM_METRICS", "1")
    tracker = get_tracker()
    with tracker.start_run(run_id="parent"):
        _quick_run("child", nested=True)
        _quick_run("asked", nested=True, log_system_metrics=True)
    assert [_sampled(r) for r in ("default", "parent", "child", "asked")] == [
        False,
        True,
        False,
        True,
    ]


def test_a_disabled_tracker_starts_no_sampler(
    ff_project: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("FF_TRACKING_DISABLED", "1")
    with get_tracker().start_run(log_system_metrics=True) as run:
        assert run._sampler is None


def test_log_system_metrics_must_be_a_bool(ff_project: Path) -> None:
    with pytest.raises(ValidationError, match="log_system_metrics must be True, False or None"):
        get_tracker().start_run(log_system_metrics="yes")  # type: ignore[arg-type]
    assert get_tracker().active_run() is None


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("FF_SYSTEM_METRICS", "maybe", "FF_SYSTEM_METRICS must be 1 or 0, got 'maybe'"),
        ("FF_SYSTEM_METRICS_INTERVAL_S", "0", "FF_SYSTEM_METRICS_INTERVAL_S must be between"),
        ("FF_SYSTEM_METRICS_INTERVAL_S", "soon", "must be a number of seconds, got 'soon'"),
        ("FF_SYSTEM_METRICS_NODE", "a/b", "FF_SYSTEM_METRICS_NODE must be 1-100 letters"),
    ],
)
def test_bad_settings_are_errors_naming_the_variable(
    ff_project: Path, clean_env: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_a_bad_interval_in_the_file_names_the_key(ff_project: Path, write_config: Any) -> None:
    write_config(ff_project, "tracking:\n  system_metrics_interval_s: -1\n")
    with pytest.raises(ConfigError, match=r"tracking\.system_metrics_interval_s must be between"):
        load_settings()


# -- names: one series per sampling process ----------------------------------------------------


def test_the_name_rule() -> None:
    host = hostname().split(".")[0]
    assert metric_prefix(None, False, {}) == "system/"
    assert metric_prefix(None, False, {"SLURM_NTASKS": "1", "WORLD_SIZE": "1"}) == "system/"
    assert metric_prefix("n1", True, {"SLURM_PROCID": "3"}) == "system/n1/"
    assert metric_prefix(None, False, {"SLURM_NNODES": "2", "SLURM_PROCID": "0"}) == (
        f"system/{host}-rank0/"
    )
    assert metric_prefix(None, False, {"WORLD_SIZE": "8", "RANK": "5"}) == f"system/{host}-rank5/"
    # An attached worker with no rank: its process id keeps it apart.
    assert metric_prefix(None, True, {}) == f"system/{host}-pid{os.getpid()}/"


# -- the job's GPUs: our selection over a stand-in NVML -----------------------------------------


@dataclass
class FakeGpu:
    uuid: str
    minor: int
    used: int = 2_000_000_000
    total: int = 8_000_000_000
    util: int | None = 40
    milliwatts: int | None = 100_000
    limit: int = 250_000


class FakeNvml:
    """NVML as a host with these GPUs shows it: handles are the FakeGpu objects."""

    def __init__(self, gpus: list[FakeGpu], migs: tuple[FakeGpu, ...] = ()) -> None:
        self.gpus, self.migs = gpus, list(migs)
        self.denied: set[int] = set()
        self.calls = 0
        self.shut = False

    def device_count(self) -> int:
        self.calls += 1
        return len(self.gpus)

    def handle(self, index: int) -> object:
        if index in self.denied:
            raise NvmlError("Insufficient Permissions")
        return self.gpus[index]

    def handle_by_uuid(self, uuid: str) -> object:
        for gpu in self.gpus + self.migs:
            if gpu.uuid == uuid:
                return gpu
        raise NvmlError("Not Found")

    def uuid(self, handle: object) -> str:
        assert isinstance(handle, FakeGpu)
        return handle.uuid

    def minor_number(self, handle: object) -> int:
        assert isinstance(handle, FakeGpu)
        return handle.minor

    def memory(self, handle: object) -> tuple[int, int]:
        assert isinstance(handle, FakeGpu)
        return handle.used, handle.total

    def utilization(self, handle: object) -> int:
        assert isinstance(handle, FakeGpu)
        if handle.util is None:
            raise NvmlError("Not Supported")
        return handle.util

    def power(self, handle: object) -> tuple[int, int]:
        assert isinstance(handle, FakeGpu)
        if handle.milliwatts is None:
            raise NvmlError("Not Supported")
        return handle.milliwatts, handle.limit

    def shutdown(self) -> None:
        self.shut = True


UUIDS = [
    "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
    "GPU-1b4f4c2a-0c4e-ea6e-3b3b-5c0c4b2f0e11",
    "GPU-1b4f9999-aaaa-bbbb-cccc-dddddddddddd",
    "GPU-77e0d1c4-5555-6666-7777-888888888888",
]


def host4() -> FakeNvml:
    """Four GPUs; minor numbers (Slurm's ids) in another order than NVML's indices."""
    gpus = [
        FakeGpu(u, m, used=(i + 1) * 1_000_000_000)
        for i, (u, m) in enumerate(zip(UUIDS, (0, 1, 3, 2), strict=True))
    ]
    return FakeNvml(
        gpus,
        migs=(FakeGpu("MIG-4f1c0e7a-9d5b-5f3e-8a7d-1e2f3a4b5c6d", -1, util=None, milliwatts=None),),
    )


def chosen(env: dict[str, str], nvml: FakeNvml | None = None) -> list[str]:
    nvml = nvml or host4()
    return [nvml.uuid(h) for h in select_gpus(nvml, requested_gpus(env))]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "2,0"}, [UUIDS[2], UUIDS[0]]),  # the job's order
        ({"CUDA_VISIBLE_DEVICES": " 3 , 1 "}, [UUIDS[3], UUIDS[1]]),
        ({"CUDA_VISIBLE_DEVICES": f"{UUIDS[3]},{UUIDS[0]}"}, [UUIDS[3], UUIDS[0]]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-8932f937,GPU-77E0"}, [UUIDS[0], UUIDS[3]]),  # prefixes
        ({"CUDA_VISIBLE_DEVICES": "GPU-1b4f,0"}, []),  # an ambiguous prefix ends the list
        ({"CUDA_VISIBLE_DEVICES": "1,7,2"}, [UUIDS[1]]),  # no device 7: CUDA stops there
        ({"CUDA_VISIBLE_DEVICES": "1,gpu2,2"}, [UUIDS[1]]),
        ({"CUDA_VISIBLE_DEVICES": "1,1"}, [UUIDS[1]]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, []),
        (
            {"CUDA_VISIBLE_DEVICES": "MIG-4f1c0e7a-9d5b-5f3e-8a7d-1e2f3a4b5c6d"},
            ["MIG-4f1c0e7a-9d5b-5f3e-8a7d-1e2f3a4b5c6d"],
        ),
        # CUDA's variable is what the job's code obeys; Slurm's ids are node-global.
        ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "2", "SLURM_JOB_ID": "7"}, [UUIDS[0]]),
        ({"GPU_DEVICE_ORDINAL": "1", "SLURM_JOB_GPUS": "2"}, [UUIDS[1]]),
        # Slurm's ids are minor numbers: /dev/nvidia2 is NVML's device 3 here.
        ({"SLURM_JOB_GPUS": "2,0", "SLURM_JOB_ID": "7"}, [UUIDS[3], UUIDS[0]]),
        ({"SLURM_STEP_GPUS": "3", "SLURM_JOB_GPUS": "0,3"}, [UUIDS[2]]),
        ({"SLURM_JOB_ID": "7"}, []),  # a Slurm job given no GPU reads none of the node's
        ({}, UUIDS),  # no scheduler: every GPU this process sees
    ],
)
def test_the_jobs_gpus_are_chosen_from_its_environment(
    env: dict[str, str], expected: list[str]
) -> None:
    assert chosen(env) == expected


def test_a_job_without_gpus_never_asks_nvml() -> None:
    nvml = host4()
    assert chosen({"SLURM_JOB_ID": "7"}, nvml) == [] and nvml.calls == 0
    assert chosen({"CUDA_VISIBLE_DEVICES": ""}, nvml) == [] and nvml.calls == 0


def test_devices_behind_the_jobs_cgroup_are_skipped() -> None:
    nvml = host4()
    nvml.denied = {0, 2}
    assert chosen({}, nvml) == [UUIDS[1], UUIDS[3]]
    assert chosen({"SLURM_JOB_GPUS": "2"}, nvml) == [UUIDS[3]]


def test_readings_are_numbered_as_the_job_sees_its_gpus() -> None:
    nvml = host4()
    reader, why = open_gpus(
        {"CUDA_VISIBLE_DEVICES": "3,MIG-4f1c0e7a-9d5b-5f3e-8a7d-1e2f3a4b5c6d"}, nvml
    )
    assert why == "" and isinstance(reader, GpuReader) and reader.count == 2
    assert reader.sample() == {
        # NVML's device 3 is the job's gpu_0.
        "gpu_0_memory_usage_percentage": 50.0,
        "gpu_0_memory_usage_megabytes": 4000.0,
        "gpu_0_utilization_percentage": 40.0,
        "gpu_0_power_usage_watts": 100.0,
        "gpu_0_power_usage_percentage": 40.0,
        # A MIG instance: NVML gives its memory, not its utilization or power.
        "gpu_1_memory_usage_percentage": 25.0,
        "gpu_1_memory_usage_megabytes": 2000.0,
    }
    reader.close()
    assert nvml.shut


def test_gpus_the_environment_names_but_nvml_lacks_are_worth_a_warning() -> None:
    reader, why = open_gpus({"CUDA_VISIBLE_DEVICES": "5"}, host4())
    assert reader is None
    assert why == "CUDA_VISIBLE_DEVICES=5 names no GPU that NVML knows: no GPU metrics"
    # A host with no GPU and no request: nothing to say.
    assert open_gpus({}, FakeNvml([])) == (None, "")


def test_the_real_nvml_without_a_driver_or_package_is_one_reason() -> None:
    # The real loader on this host: nvidia-ml-py missing, or present without an NVIDIA driver.
    state = nvml_state()
    if state == "works":
        pytest.skip("this host has a working NVML: see the GPU test below")
    expected = "nvidia-ml-py is not installed" if state == "missing" else "NVML cannot start"
    assert open_gpus({}) == (None, "")  # nothing asked for: nothing to say
    reader, why = open_gpus({"CUDA_VISIBLE_DEVICES": "0"})
    assert reader is None and why.startswith("CUDA_VISIBLE_DEVICES=0 names GPUs, but ")
    assert expected in why


def test_a_request_describes_itself() -> None:
    assert GpuRequest("CUDA_VISIBLE_DEVICES", ("0", "1")).describe() == "CUDA_VISIBLE_DEVICES=0,1"
    assert GpuRequest("", None).describe() == "every GPU NVML sees"


# -- missing libraries: one warning, the run goes on; nothing heavy at import ------------------

NO_PSUTIL = """
    import sys, time
    sys.modules["psutil"] = None  # as if it were not installed
    from formula_foundry.tracking import get_tracker
    tracker = get_tracker()
    for run_id in ("first", "second"):
        with tracker.start_run(run_id=run_id, log_system_metrics=True) as run:
            run.log_metric("loss", 0.5)
            time.sleep(0.3)
        print(run.status)
"""


def test_without_psutil_one_warning_and_the_runs_go_on(ff_project: Path) -> None:
    proc = run_python(NO_PSUTIL, cwd=ff_project, env=host_env(FF_SYSTEM_METRICS_INTERVAL_S="0.1"))
    assert proc.stdout.split() == ["FINISHED", "FINISHED"]
    assert proc.stderr.splitlines() == [
        "formula-foundry system metrics: psutil is not installed: no CPU, memory, disk or "
        "network metrics (pip install 'formula-foundry[system]'); the run goes on"
    ]
    for run_id in ("first", "second"):
        events = spooled(ff_project / "data" / "runs", run_id)
        assert system_points(events) == {}
        assert [e.kind for e in events][-2:] == ["metrics", "run_end"]


def test_gpus_that_cannot_be_read_cost_one_warning_not_the_host_metrics(
    ff_project: Path,
) -> None:
    if nvml_state() == "works":
        pytest.skip("this host's NVML reads its GPUs: see the GPU test below")
    # CUDA_VISIBLE_DEVICES names a GPU; this host has no NVIDIA driver (or no nvidia-ml-py).
    proc = run_python(
        NO_PSUTIL.replace('sys.modules["psutil"] = None', "pass"),
        cwd=ff_project,
        env=child_env(FF_SYSTEM_METRICS_INTERVAL_S="0.1", CUDA_VISIBLE_DEVICES="0"),
    )
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith(
        "formula-foundry system metrics: CUDA_VISIBLE_DEVICES=0 names GPUs, but "
    )
    assert warnings[0].endswith("no GPU metrics; the run goes on")
    for run_id in ("first", "second"):
        assert set(system_points(spooled(ff_project / "data" / "runs", run_id))) == set(HOST_NAMES)


def test_psutil_and_nvml_are_loaded_only_by_a_run_that_samples(tmp_path: Path) -> None:
    code = """
        import json, sys, time
        def loaded():
            names = ("psutil", "pynvml", "formula_foundry.tracking.system_metrics")
            return [n for n in names if n in sys.modules]
        import formula_foundry.tracking
        seen = [loaded()]
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run() as run:
            run.log_metric("m", 1.0)
        seen.append(loaded())
        with get_tracker().start_run(log_system_metrics=True) as run:
            time.sleep(0.3)
        seen.append(loaded())
        print(json.dumps(seen))
    """
    at_import, after_a_run, after_sampling = json.loads(run_python(code, cwd=tmp_path).stdout)
    assert at_import == [] and after_a_run == []
    # No scheduler here: the sampler asks NVML for every GPU (when nvidia-ml-py is installed).
    nvml = ["pynvml"] if nvml_state() != "missing" else []
    assert after_sampling == ["psutil", *nvml, "formula_foundry.tracking.system_metrics"]
