"""The host's CPU, memory, disk and network, read with psutil under MLflow's names and units.

The names, units and rounding are those of MLflow's ``CPUMonitor``, ``DiskMonitor`` and
``NetworkMonitor`` (``mlflow/system_metrics/metrics/``), so the MLflow UI's "System metrics"
tab shows them as it shows its own: megabytes are 10**6 bytes, percentages and sizes are
rounded to one decimal, network totals count from the sampler's start.

One difference, on purpose: the CPU utilization is the busy share of the whole window since
the previous sample, computed from this reader's own CPU-time counters. ``psutil.cpu_percent``
keeps one process-wide previous reading, so any other caller (MLflow's own monitor, a
progress bar) would cut our window short.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Final

_MB: Final = 1e6  # MLflow's megabytes: 10**6 bytes

# The names this reader logs (under system/ or system/<node>/).
HOST_METRICS: Final = (
    "cpu_utilization_percentage",
    "system_memory_usage_megabytes",
    "system_memory_usage_percentage",
    "disk_usage_percentage",
    "disk_usage_megabytes",
    "disk_available_megabytes",
    "network_receive_megabytes",
    "network_transmit_megabytes",
)


def load_psutil() -> Any:
    """The psutil module; ``ImportError`` when it is not installed (or made unimportable)."""
    # Imported by name, in the sampler's thread only: a process that never samples never
    # loads it, and psutil ships no type hints.
    return importlib.import_module("psutil")


class HostReader:
    """One :meth:`sample` per window: what the host did since the previous one."""

    def __init__(self, psutil: Any) -> None:
        self._ps = psutil
        self._cpu = _busy_and_total(psutil.cpu_times())
        net = psutil.net_io_counters()
        self._net0 = (net.bytes_recv, net.bytes_sent) if net is not None else (0, 0)

    def sample(self) -> dict[str, float]:
        ps, out = self._ps, {}
        busy, total = _busy_and_total(ps.cpu_times())
        d_busy, d_total = busy - self._cpu[0], total - self._cpu[1]
        self._cpu = (busy, total)
        # No tick elapsed (a window shorter than the kernel's clock): nothing was busy.
        share = min(max(d_busy / d_total, 0.0), 1.0) if d_total > 0 else 0.0
        out["cpu_utilization_percentage"] = round(share * 100, 1)
        memory = ps.virtual_memory()
        out["system_memory_usage_megabytes"] = round(memory.used / _MB, 1)
        out["system_memory_usage_percentage"] = round(memory.used / memory.total * 100, 1)
        disk = ps.disk_usage(os.sep)
        out["disk_usage_percentage"] = round(float(disk.percent), 1)
        out["disk_usage_megabytes"] = round(disk.used / _MB, 1)
        out["disk_available_megabytes"] = round(disk.free / _MB, 1)
        net = ps.net_io_counters()
        if net is not None:  # None: the host has no network interface
            # MLflow leaves these unrounded.
            out["network_receive_megabytes"] = (net.bytes_recv - self._net0[0]) / _MB
            out["network_transmit_megabytes"] = (net.bytes_sent - self._net0[1]) / _MB
        return out


def _busy_and_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds, as ``psutil.cpu_percent`` counts them: on Linux the guest
    times are already inside user and nice; idle and iowait are not busy."""
    total = float(sum(times))
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    idle = float(times.idle) + getattr(times, "iowait", 0.0)
    return total - idle, total
