"""The ``ff-sync`` command runs MLflow without pandas, SciPy and PyArrow, on every destination.

``formula_foundry.sync.mlflow.lean_imports`` hides them from the command's process (a sync host's
peak memory drops by ~75 MiB). These tests run the real entry point in a child process and
check both halves of the bargain: the modules stay out, and the store ends up exactly as the
spools say (``ff-sync verify``, itself run the lean way, and a comparison with a pass made
with every import).
"""

from __future__ import annotations

import json
from typing import Any

from .conftest import RICH_SPOOL, Destination, Project, comparable

HIDDEN = ["pandas", "scipy", "pyarrow"]
# A sync pass then a verify, through the console script's function, in one fresh process.
ENTRY = """
import json, sys
PRELOAD
from formula_foundry.sync.commands.cli import run

codes = []
for args in (["--config", sys.argv[1]], ["--config", sys.argv[1], "verify"]):
    sys.argv = ["ff-sync", *args]
    try:
        run()
    except SystemExit as exc:
        codes.append(exc.code)
names = ("mlflow", "pandas", "scipy", "pyarrow")
print(json.dumps({"codes": codes, "loaded": [m for m in names if m in sys.modules]}))
"""


def _run_entry(project: Project, preload: str = "", **env: str) -> dict[str, Any]:
    code = ENTRY.replace("PRELOAD", preload)
    result = project.python(code, str(project.config), timeout=300, env=env)
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_ff_sync_syncs_and_verifies_without_pandas(
    project: Project, destination: Destination
) -> None:
    project.spool(RICH_SPOOL, "200")
    answer = _run_entry(project)
    assert answer == {"codes": [0, 0], "loaded": ["mlflow"]}
    # What the lean process wrote is what a process with every import writes.
    lean = project.snapshot()
    assert project.sync(replay=True).exit_code == 0  # in-process: pandas is loaded here
    assert comparable(project.snapshot()) == comparable(lean)


def test_opting_out_loads_everything(project: Project) -> None:
    project.spool(RICH_SPOOL, "5")
    answer = _run_entry(project, FF_SYNC_IMPORT_ALL="1")
    assert answer["codes"] == [0, 0]
    assert set(HIDDEN) <= set(answer["loaded"])


def test_a_module_already_loaded_is_not_half_hidden(project: Project) -> None:
    """A process that already imported pandas keeps the rest importable too."""
    project.spool(RICH_SPOOL, "5")
    answer = _run_entry(project, preload="import pandas")
    assert answer["codes"] == [0, 0]
    assert set(HIDDEN) <= set(answer["loaded"])


def test_a_hidden_module_says_why_and_how_to_load_it(project: Project) -> None:
    code = """
    from formula_foundry.sync.mlflow.lean_imports import hide_unused_modules
    assert hide_unused_modules()
    try:
        import scipy.sparse
    except ModuleNotFoundError as exc:
        print(exc.name, "|", exc)
    """
    out = project.python(code).stdout.strip()
    assert out.startswith("scipy | No module named 'scipy' (ff-sync hides it")
    assert "FF_SYNC_IMPORT_ALL=1" in out


def test_a_plugin_that_needs_a_hidden_module_gets_a_clear_error(project: Project) -> None:
    """MLflow that cannot start without a hidden package: exit 2 naming the opt-out."""
    project.spool(RICH_SPOOL, "5")
    # Stands in for a tracking-store plugin that imports pandas when MLflow loads it.
    plugin = project.root / "plugin"
    (plugin / "mlflow_needs_pandas").mkdir(parents=True)
    (plugin / "mlflow_needs_pandas" / "__init__.py").write_text("import pandas\n")
    (plugin / "sitecustomize.py").write_text(
        "import builtins\n"
        "_real = builtins.__import__\n"
        "def _imp(name, *a, **k):\n"
        "    if name == 'mlflow':\n"
        "        import mlflow_needs_pandas  # noqa: F401\n"
        "    return _real(name, *a, **k)\n"
        "builtins.__import__ = _imp\n"
    )
    result = project.ff_sync(PYTHONPATH=str(plugin))
    assert result.returncode == 2, result.stderr
    assert "MLflow needs 'pandas', which ff-sync hides" in result.stderr
    assert "FF_SYNC_IMPORT_ALL=1" in result.stderr
    assert "Traceback" not in result.stderr
    again = project.ff_sync(PYTHONPATH=str(plugin), FF_SYNC_IMPORT_ALL="1")
    assert again.returncode == 0, again.stderr


# A pass over a store that already exists: what a cron job finds every few minutes.
FEW_NEW_EVENTS = """
with tracker.start_run(run_name="small", tags={"team": "si"}) as run:
    run.log_params({"lr": 0.1, "layers": 4})
    run.set_tag("phase", "one")
    run.log_metrics({f"k{i}": 0.5 * i for i in range(10)}, step=0)
"""
PASS_ONLY = """
import json, sys
from formula_foundry.sync.commands.cli import run

sys.argv = ["ff-sync", "--config", sys.argv[1]]
try:
    run()
except SystemExit as exc:
    code = exc.code
names = ("mlflow", "sqlalchemy", "alembic")
print(json.dumps({"code": code, "loaded": [m for m in names if m in sys.modules]}))
"""


def test_a_few_new_events_into_a_known_store_import_neither_mlflow_nor_sqlalchemy(
    project: Project, destination: Destination
) -> None:
    project.spool(RICH_SPOOL, "5")
    assert project.sync().exit_code == 0  # the store exists, with its runs and identity
    project.spool(FEW_NEW_EVENTS)
    result = project.python(PASS_ONLY, str(project.config), timeout=300)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # A server is reached through MLflow's client; SQL stores of a known schema are not.
    expected = ["mlflow"] if destination.kind == "http" else []
    assert answer["code"] == 0 and [m for m in answer["loaded"] if m == "mlflow"] == expected
    if destination.kind != "http":
        assert answer["loaded"] == []
    # What it wrote is what the spools say, read back through MLflow.
    assert _run_entry(project)["codes"] == [0, 0]
