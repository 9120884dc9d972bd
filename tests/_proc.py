"""Child processes of the tests: one rule for their environment, one way to run a snippet."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from formula_foundry.tracking.gpus import GLOBAL_ID_VARS, INDEX_VARS
from formula_foundry.tracking.scheduler import JOB_FACTS
from formula_foundry.tracking.system_metrics import RANK_VARS, SIZE_VARS

# Environment variables that change where formula-foundry reads its configuration or writes
# its data. A developer's shell (or a CI job) may set them; no test or child should inherit
# them.
CONFIG_ENV_VARS = (
    "FF_CONFIG",
    "FF_SPOOL_ROOT",
    "FF_TRACKING_DISABLED",
    "FF_DURABILITY",
    "MLFLOW_TRACKING_URI",
    "FF_RUN_ID",
    "FF_SYSTEM_METRICS",
    "FF_SYSTEM_METRICS_INTERVAL_S",
    "FF_SYSTEM_METRICS_NODE",
    "FF_CAPTURE_OUTPUT",
    "FF_CONSOLE_MAX_BYTES",
    # The batch job's variables the tracker turns into tags: a suite run inside a Slurm (or
    # PBS, LSF) allocation must log what it logs elsewhere.
    *JOB_FACTS.values(),
    # What the system metrics' names and GPUs depend on (ranks, job size, the job's GPUs).
    *RANK_VARS,
    *SIZE_VARS,
    *INDEX_VARS,
    *GLOBAL_ID_VARS,
)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the configuration variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV_VARS}
    env.update(extra)
    return env


def run_python(
    code: str,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter of this venv in ``cwd``, with ``env``
    (default: :func:`child_env`); fail the test if it exits non-zero and ``check``."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env if env is not None else child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"child exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
