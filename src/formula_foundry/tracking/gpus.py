"""The job's own GPUs, and their readings under MLflow's system-metric names.

MLflow's monitor reports every GPU of the host (mlflow/mlflow#13398); on a shared node that is
other people's work. Here only the GPUs the job was given are read, numbered as the job sees
them (``gpu_0`` is the first GPU the job's CUDA code sees):

1. ``CUDA_VISIBLE_DEVICES`` (what CUDA itself obeys), else ``GPU_DEVICE_ORDINAL`` (Slurm sets
   it beside the first, same form): indices into what NVML sees, ``GPU-<uuid>`` (a unique
   prefix is enough, as for CUDA) or ``MIG-<uuid>``. As CUDA does, the list ends at the first
   entry that names no device; ``""``, ``-1`` or ``NoDevFiles`` name none.
2. else ``SLURM_STEP_GPUS``, else ``SLURM_JOB_GPUS``: Slurm's node-global GPU ids, which are
   the devices' minor numbers (``/dev/nvidia<N>``) whatever cgroup the job runs in.
3. else inside a Slurm job (``SLURM_JOB_ID``): no GPU — the job was given none.
4. else (a workstation, no scheduler): every GPU NVML sees.

NVML sits behind :class:`Nvml`, so the selection is tested with a stand-in; the real one is
``nvidia-ml-py`` (``pynvml``), imported only when a sampler starts.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

# Variables read in order; the first one set decides (see the module docstring).
INDEX_VARS: Final = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")
GLOBAL_ID_VARS: Final = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
_MB: Final = 1e6  # MLflow's megabytes: 10**6 bytes


class NvmlError(Exception):
    """An NVML call failed (no driver, no such device, not supported for this device)."""


class Nvml(Protocol):
    """The NVML calls the sampler makes. Handles are opaque; every method may raise
    :class:`NvmlError`."""

    def device_count(self) -> int: ...

    def handle(self, index: int) -> object: ...

    def handle_by_uuid(self, uuid: str) -> object: ...

    def uuid(self, handle: object) -> str: ...

    def minor_number(self, handle: object) -> int: ...

    def memory(self, handle: object) -> tuple[int, int]:
        """Bytes used and total."""
        ...

    def utilization(self, handle: object) -> int:
        """Percent of the last sample period the GPU was busy."""
        ...

    def power(self, handle: object) -> tuple[int, int]:
        """Milliwatts drawn and the enforced limit in milliwatts."""
        ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class GpuRequest:
    """The GPUs the environment gives the job: ``entries`` from ``source``, or every GPU
    NVML sees (``entries is None``)."""

    source: str
    entries: tuple[str, ...] | None
    global_ids: bool = False

    def describe(self) -> str:
        if self.entries is None:
            return "every GPU NVML sees"
        return f"{self.source}={','.join(self.entries)}"


def requested_gpus(environ: Mapping[str, str]) -> GpuRequest:
    """Which GPUs belong to this process, from its environment (rules: module docstring)."""
    for var in INDEX_VARS:
        value = environ.get(var)
        if value is not None:
            return GpuRequest(var, _entries(value))
    for var in GLOBAL_ID_VARS:
        value = environ.get(var)
        if value:
            ids = []
            for part in value.split(","):
                part = part.strip()
                if not part.isdigit():
                    break
                ids.append(part)
            return GpuRequest(var, tuple(ids), global_ids=True)
    if environ.get("SLURM_JOB_ID"):
        return GpuRequest("SLURM_JOB_ID (a Slurm job given no GPU)", ())
    return GpuRequest("", None)


def _entries(value: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part.isdigit() or part.startswith(("GPU-", "MIG-")):
            out.append(part)
        else:  # CUDA ignores this entry and every one after it
            break
    return tuple(out)


def select_gpus(nvml: Nvml, request: GpuRequest) -> list[object]:
    """The NVML handles of the requested GPUs, in the job's order (``gpu_0`` first).

    An entry that names no device ends the list, as in CUDA; a device named twice counts once.
    """
    if request.entries == ():
        return []
    devices = [_handle(nvml, i) for i in range(nvml.device_count())]
    if request.entries is None:
        return [h for h in devices if h is not None]
    chosen: list[object] = []
    for entry in request.entries:
        handle = _resolve(nvml, devices, entry, request.global_ids)
        if handle is None:
            break
        if not any(h is handle for h in chosen):
            chosen.append(handle)
    return chosen


def _handle(nvml: Nvml, index: int) -> object | None:
    try:
        return nvml.handle(index)
    except NvmlError:  # a device of another job, behind the job's cgroup
        return None


def _resolve(
    nvml: Nvml, devices: list[object | None], entry: str, global_id: bool
) -> object | None:
    if global_id:
        for handle in devices:
            if handle is not None and _minor(nvml, handle) == int(entry):
                return handle
        return None
    if entry.isdigit():
        index = int(entry)
        return devices[index] if index < len(devices) else None
    if entry.startswith("MIG-"):
        try:
            return nvml.handle_by_uuid(entry)
        except NvmlError:
            return None
    # GPU-<uuid>: CUDA takes any prefix that names one device.
    wanted = entry.lower()
    matches = [h for h in devices if h is not None and _uuid(nvml, h).startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def _minor(nvml: Nvml, handle: object) -> int:
    try:
        return nvml.minor_number(handle)
    except NvmlError:
        return -1


def _uuid(nvml: Nvml, handle: object) -> str:
    try:
        return nvml.uuid(handle).lower()
    except NvmlError:
        return ""


class GpuReader:
    """Reads the selected GPUs; one :meth:`sample` per window, MLflow's names and units."""

    def __init__(self, nvml: Nvml, handles: list[object]) -> None:
        self._nvml = nvml
        self._handles = handles

    @property
    def count(self) -> int:
        return len(self._handles)

    def sample(self) -> dict[str, float]:
        """``gpu_<i>_...`` readings (MLflow's ``GPUMonitor``, rounded as it rounds). A reading
        the device does not offer (a MIG instance has no utilization or power) is left out."""
        nvml, out = self._nvml, {}
        for i, handle in enumerate(self._handles):
            name = f"gpu_{i}_"
            with contextlib.suppress(NvmlError, ZeroDivisionError):
                used, total = nvml.memory(handle)
                out[name + "memory_usage_percentage"] = round(used / total * 100, 1)
                out[name + "memory_usage_megabytes"] = round(used / _MB, 1)
            with contextlib.suppress(NvmlError):
                out[name + "utilization_percentage"] = float(nvml.utilization(handle))
            with contextlib.suppress(NvmlError, ZeroDivisionError):
                milliwatts, limit = nvml.power(handle)
                out[name + "power_usage_watts"] = round(milliwatts / 1000, 1)
                out[name + "power_usage_percentage"] = round(milliwatts / limit * 100, 1)
        return out

    def close(self) -> None:
        with contextlib.suppress(NvmlError):
            self._nvml.shutdown()


def open_gpus(environ: Mapping[str, str], nvml: Nvml | None = None) -> tuple[GpuReader | None, str]:
    """A reader of this job's GPUs, or None and why not (``""``: the job has none, say nothing).

    ``nvml``: a stand-in for the real NVML (tests); by default ``pynvml`` is loaded here.
    The reason is worth a warning only when the environment names GPUs that cannot be read.
    """
    request = requested_gpus(environ)
    if request.entries == ():
        return None, ""
    named = request.entries is not None
    if nvml is None:
        try:
            nvml = load_nvml()
        except ImportError:
            why = (
                f"{request.describe()} names GPUs, but nvidia-ml-py is not installed: no GPU "
                "metrics (pip install 'formula-foundry[system]')"
            )
            return None, why if named else ""
        except NvmlError as exc:
            why = f"{request.describe()} names GPUs, but NVML cannot start ({exc}): no GPU metrics"
            return None, why if named else ""
    try:
        handles = select_gpus(nvml, request)
    except NvmlError as exc:
        handles, problem = [], f" ({exc})"
    else:
        problem = ""
    if not handles:
        reader = GpuReader(nvml, [])
        reader.close()
        why = f"{request.describe()} names no GPU that NVML knows{problem}: no GPU metrics"
        return None, why if named else ""
    return GpuReader(nvml, handles), ""


class _Pynvml:
    """:class:`Nvml` over ``pynvml`` (nvidia-ml-py)."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self._call(module.nvmlInit)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._m.NVMLError as exc:
            raise NvmlError(str(exc)) from None

    def device_count(self) -> int:
        return int(self._call(self._m.nvmlDeviceGetCount))

    def handle(self, index: int) -> object:
        return self._call(self._m.nvmlDeviceGetHandleByIndex, index)

    def handle_by_uuid(self, uuid: str) -> object:
        return self._call(self._m.nvmlDeviceGetHandleByUUID, uuid)

    def uuid(self, handle: object) -> str:
        value = self._call(self._m.nvmlDeviceGetUUID, handle)
        return value.decode() if isinstance(value, bytes) else str(value)

    def minor_number(self, handle: object) -> int:
        return int(self._call(self._m.nvmlDeviceGetMinorNumber, handle))

    def memory(self, handle: object) -> tuple[int, int]:
        info = self._call(self._m.nvmlDeviceGetMemoryInfo, handle)
        return int(info.used), int(info.total)

    def utilization(self, handle: object) -> int:
        return int(self._call(self._m.nvmlDeviceGetUtilizationRates, handle).gpu)

    def power(self, handle: object) -> tuple[int, int]:
        milliwatts = self._call(self._m.nvmlDeviceGetPowerUsage, handle)
        limit = self._call(self._m.nvmlDeviceGetEnforcedPowerLimit, handle)
        return int(milliwatts), int(limit)

    def shutdown(self) -> None:
        self._call(self._m.nvmlShutdown)


def load_nvml() -> Nvml:
    """The real NVML. ``ImportError``: nvidia-ml-py is missing; :class:`NvmlError`: no driver."""
    # Imported by name, in the sampler's thread only: it ships no type hints, and a process
    # that never samples never loads it.
    return _Pynvml(importlib.import_module("pynvml"))
