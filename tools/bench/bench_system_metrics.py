#!/usr/bin/env python3
"""Benchmark what system metrics cost: the ``log_metric`` rate with the sampler on, and the
sampler's own CPU.

Usage::

    python tools/bench/bench_system_metrics.py [--seconds 22] [--runs 3] [--dir DIR] [--json]

* **log_metric rate, on vs off** — fresh interpreters call ``run.log_metric`` as fast as they
  can for ``--seconds`` (default 22: two samples at the default 10 s interval, and the
  sampler's start — psutil's import — inside the timed stretch), with
  ``log_system_metrics=False`` and ``True`` at the default interval, and (for information) at a
  0.1 s interval, 100 x the default rate, to make any contention visible. The three run in
  alternation, ``--runs`` rounds, so a burst of load on the machine hits all of them; each
  round gives an on/off ratio; the median, lowest and highest are reported. To keep a 22 s
  loop (tens of millions of events) off the disk, the child empties its segment every 2M calls,
  outside the timed stretch: the writer appends with ``O_APPEND``, so it writes on at the new
  end.
* **sampler CPU per sample** — a run samples every 0.05 s for ``--sample-seconds`` in this
  process; the sampler thread's own CPU time (``time.thread_time``, around each
  sample-and-log) divided by the number of samples, extrapolated to one sample every 10 s as
  a percentage of one core. Its start (imports, the first readings) is reported apart: it is
  paid once per run.

Targets: ``log_metric`` with system metrics on at the default interval <= 1.02 x off (median);
sampler CPU <= 0.5 % of one core at a 10 s interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.02
TARGET_CPU_PERCENT = 0.5
DEFAULT_INTERVAL_S = 10.0

CONFIG_VARS = (
    "FF_CONFIG",
    "FF_SPOOL_ROOT",
    "FF_DURABILITY",
    "FF_TRACKING_DISABLED",
    "FF_SYSTEM_METRICS",
    "FF_SYSTEM_METRICS_INTERVAL_S",
    "FF_SYSTEM_METRICS_NODE",
)

_RATE_CHILD = """
import json, os, sys, time
from formula_foundry.tracking import get_tracker

seconds, on = float(sys.argv[1]), sys.argv[2] == "1"
chunk, empty_every = 10_000, 2_000_000
with get_tracker().start_run(run_name="bench-system", log_system_metrics=on) as run:
    log_metric = run.log_metric
    log_metric("loss", 0.5, step=0)  # opens the segment, caches the key
    path = run.spool_path
    calls, timed, since_empty = 0, 0.0, 0
    while timed < seconds:
        start = time.perf_counter()
        for i in range(calls, calls + chunk):
            log_metric("loss", 0.5, step=i)
        timed += time.perf_counter() - start
        calls += chunk
        since_empty += chunk
        if since_empty >= empty_every:
            os.truncate(path, 0)
            since_empty = 0
    sampler = run._sampler
    samples = sampler.samples if sampler is not None else 0
print(json.dumps({"us": timed / calls * 1e6, "calls": calls, "samples": samples}))
"""


def bench_rate(folder: Path, seconds: float, runs: int) -> dict[str, list[float]]:
    """µs per log_metric call, per round, for off / on (10 s) / on (0.1 s)."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env["FF_SPOOL_ROOT"] = str(folder / "rate-spool")
    modes = {
        "off": {"on": "0"},
        "on_10s": {"on": "1", "FF_SYSTEM_METRICS_INTERVAL_S": str(DEFAULT_INTERVAL_S)},
        "on_100ms": {"on": "1", "FF_SYSTEM_METRICS_INTERVAL_S": "0.1"},
    }
    out: dict[str, list[float]] = {m: [] for m in modes}
    out.update({f"{m}_samples": [] for m in modes})
    for _ in range(runs):
        for mode, spec in modes.items():
            child_env = {**env, **{k: v for k, v in spec.items() if k != "on"}}
            proc = subprocess.run(
                [sys.executable, "-c", _RATE_CHILD, str(seconds), spec["on"]],
                env=child_env,
                check=True,
                capture_output=True,
                text=True,
            )
            fig = json.loads(proc.stdout)
            out[mode].append(fig["us"])
            out[f"{mode}_samples"].append(fig["samples"])
            for seg in (folder / "rate-spool").rglob("seg-*.jsonl"):
                seg.unlink()
    return out


def bench_sampler_cpu(folder: Path, seconds: float) -> dict[str, float]:
    """The sampler thread's CPU per sample (and at its start), in this process."""
    os.environ["FF_SPOOL_ROOT"] = str(folder / "cpu-spool")
    os.environ["FF_SYSTEM_METRICS_INTERVAL_S"] = "0.05"
    try:
        from formula_foundry.tracking import get_tracker

        tracker = get_tracker()
    finally:
        del os.environ["FF_SPOOL_ROOT"], os.environ["FF_SYSTEM_METRICS_INTERVAL_S"]
    with tracker.start_run(run_name="bench-sampler", log_system_metrics=True) as run:
        sampler = run._sampler
        time.sleep(seconds)
    if sampler is None or sampler.samples == 0:
        raise SystemExit("the sampler took no sample: is psutil installed?")
    per_sample = sampler.sample_cpu_s / sampler.samples
    return {
        "samples": float(sampler.samples),
        "cpu_per_sample_ms": per_sample * 1000,
        "startup_cpu_ms": sampler.startup_cpu_s * 1000,
        "cpu_percent_at_10s": per_sample / DEFAULT_INTERVAL_S * 100,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=22.0, help="timed loop per child")
    parser.add_argument("--runs", type=int, default=3, help="rounds of off / on / on_100ms")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ff-bench-sysm-", dir=args.dir) as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # no config/mlflow.yaml here: defaults plus the overrides above
        for name in CONFIG_VARS:
            os.environ.pop(name, None)
        rate = bench_rate(folder, args.seconds, args.runs)
        cpu = bench_sampler_cpu(folder, args.sample_seconds)

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, log_metric for "
        f"{args.seconds:g} s per child, {args.runs} rounds (off, on 10 s, on 0.1 s in turn)"
    )
    fig: dict[str, object] = {"rate_us": rate, "sampler": cpu}
    for mode in ("off", "on_10s", "on_100ms"):
        us = rate[mode]
        samples = rate[f"{mode}_samples"]
        print(
            f"log_metric, {mode:<9} {statistics.median(us):6.3f} µs/call  "
            f"(rounds: {', '.join(f'{u:.3f}' for u in us)}; samples taken: "
            f"{', '.join(str(int(s)) for s in samples)})"
        )
    for mode in ("on_10s", "on_100ms"):
        ratios = [on / off for on, off in zip(rate[mode], rate["off"], strict=True)]
        med = statistics.median(ratios)
        fig[f"ratio_{mode}"] = ratios
        target = (
            f"   [<= {TARGET_RATIO} x: {verdict(med <= TARGET_RATIO)}]" if mode == "on_10s" else ""
        )
        print(
            f"ratio {mode:<9} / off  median {med:.3f} x  "
            f"(lowest {min(ratios):.3f}, highest {max(ratios):.3f}){target}"
        )
    pct = cpu["cpu_percent_at_10s"]
    print(
        f"sampler CPU: {cpu['cpu_per_sample_ms']:.3f} ms per sample over "
        f"{int(cpu['samples'])} samples = {pct:.4f} % of one core at a 10 s interval "
        f"[<= {TARGET_CPU_PERCENT} %: {verdict(pct <= TARGET_CPU_PERCENT)}]; "
        f"start (imports, first readings) {cpu['startup_cpu_ms']:.1f} ms once per run"
    )
    if args.json:
        print(json.dumps(fig, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
