"""The architecture, checked: what each part may import, cheap imports, sizes, public APIs, the map.

docs/architecture.md is the map of the parts and of the rules below; these tests keep the code
and the map in step. One file for the whole package (it replaced three per-package ones).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import formula_foundry
import formula_foundry.substrate as substrate
import formula_foundry.sync as sync
from formula_foundry.sync.commands.cli import main
from tests.tracking._helpers import run_python

SRC = Path(formula_foundry.__file__).resolve().parent  # src/formula_foundry
DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_MODULE_LINES = 400

# Third-party modules allowed in these modules only (paths relative to SRC). The rule holds
# whether or not the allowed module exists yet.
ONLY_IN = {
    "yaml": {"config.py"},
    "click": {"sync/commands/cli.py"},
    # The MLflow adapter: client_sink writes (internals: the private APIs it reaches into),
    # snapshot reads (for tests and verify).
    "mlflow": {
        "sync/mlflow/client_sink.py",
        "sync/mlflow/internals.py",
        "sync/mlflow/snapshot.py",
        # The drop-in implements MLflow's store interfaces: only these modules of it.
        "dropin/store.py",
        "dropin/artifacts.py",
        "dropin/registry.py",
    },
    "sqlalchemy": {
        "sync/mlflow/internals.py",
        "sync/mlflow/store_access.py",
    },
}
# The folders (and the drop-in's store modules) that may import MLflow or SQLAlchemy.
MLFLOW_HOME = ("sync/mlflow/", "dropin/store.py", "dropin/artifacts.py", "dropin/registry.py")
HEAVY = ("mlflow", "yaml", "click", "numpy", "pandas", "sqlalchemy", "torch", "psutil", "pynvml")
# What each part may not import (module-name prefixes).
LAYERS = {
    "substrate/": (
        "formula_foundry.tracking",
        "formula_foundry.sync",
        "formula_foundry.dropin",
    ),
    "tracking/": ("formula_foundry.sync", "formula_foundry.dropin"),
    # The drop-in is a producer beside the tracker: MLflow loads it, nothing of ours does.
    "sync/": ("formula_foundry.dropin",),
    # The engine knows a Sink, not MLflow, and not the commands on top of it.
    "sync/engine/": ("formula_foundry.sync.commands", "formula_foundry.sync.mlflow"),
    "sync/mlflow/": ("formula_foundry.sync.commands",),
    "errors.py": ("formula_foundry.",),
    "ids.py": ("formula_foundry.",),
    "config.py": (
        "formula_foundry.tracking",
        "formula_foundry.sync",
        "formula_foundry.substrate",
        "formula_foundry.dropin",
    ),
}
# The one exception to a layer rule: the engine's default sink is MLflow's client, imported
# inside the function that builds it (sync_once without a sink_factory).
LAYER_EXCEPTIONS = {("sync/engine/sync_pass.py", "formula_foundry.sync.mlflow.client_sink")}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (functions included)."""
    # The package a relative import starts from: formula_foundry.tracking for
    # tracking/tracker.py and for tracking/__init__.py alike.
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def test_the_scan_sees_imports_inside_functions_and_relative_ones() -> None:
    # The scanner itself must be able to find what the rules forbid.
    tracker = imported_modules(SRC / "tracking" / "tracker.py")
    assert "formula_foundry.config" in tracker  # imported inside get_tracker()
    run = imported_modules(SRC / "tracking" / "run.py")
    assert "formula_foundry.substrate" in run  # imported inside log_artifact_reference()
    assert "yaml" in imported_modules(SRC / "config.py")  # imported inside _read_values()


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_each_heavy_library_is_imported_by_its_modules_only(library: str) -> None:
    offenders = []
    for path in source_files():
        mods = imported_modules(path)
        uses = any(m == library or m.startswith(library + ".") for m in mods)
        if uses and rel(path) not in ONLY_IN[library]:
            offenders.append(rel(path))
    assert offenders == [], f"{library} may only be imported by {sorted(ONLY_IN[library])}"


def test_mlflow_and_sqlalchemy_live_in_the_adapter_folder() -> None:
    for library in ("mlflow", "sqlalchemy"):
        assert all(m.startswith(MLFLOW_HOME) for m in ONLY_IN[library]), library


def test_each_part_imports_only_what_its_layer_may() -> None:
    offenders = []
    for path in source_files():
        for prefix, forbidden in LAYERS.items():
            if rel(path).startswith(prefix):
                bad = sorted(
                    m
                    for m in imported_modules(path)
                    if m.startswith(forbidden)
                    and m != "formula_foundry.errors"
                    and not any(
                        (rel(path), m.rsplit(".", k)[0]) in LAYER_EXCEPTIONS for k in (0, 1)
                    )
                )
                if bad:
                    offenders.append((rel(path), bad))
    assert offenders == []


def _module_level_imports(path: Path) -> set[str]:
    """The formula_foundry modules ``path`` imports when it is imported: module level, not
    inside functions or ``if TYPE_CHECKING``."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("formula_foundry"))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.startswith("formula_foundry"):
                for alias in node.names:  # `from pkg import module` names a module
                    full = f"{module}.{alias.name}"
                    out.add(full if _module_path(full) else module)
    return out


def _module_path(name: str) -> Path | None:
    parts = name.split(".")[1:]
    for candidate in (SRC.joinpath(*parts).with_suffix(".py"), SRC.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return None


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in source_files():
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in _module_level_imports(path) if m != name}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own modules, which import siblings, is no cycle.
    real = [c for c in cycles if not any(c[0].startswith(m + ".") for m in c[1:])]
    assert real == []


def test_the_tracking_package_checks_data_without_assert() -> None:
    # `python -O` removes asserts; a data check must survive it.
    for path in sorted((SRC / "tracking").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert asserts == [], f"{path.name} uses assert on lines {asserts}"


def test_modules_of_the_tracker_and_the_sync_stay_small() -> None:
    # Not yet: the tracker's three biggest, the drop-in's store and run book, the artifact store.
    parts = [*(SRC / "sync").rglob("*.py"), *(SRC / "tracking").glob("*.py")]
    exempt = {"tracking/spool_writer.py", "tracking/run.py", "tracking/tracker.py"}
    sizes = {rel(p): len(p.read_text().splitlines()) for p in parts if rel(p) not in exempt}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# -- cheap imports ----------------------------------------------------------------------------

CHECK_MODULES = """
    import json, sys
    import formula_foundry.tracking
    after_import = sorted(m for m in {heavy} if m in sys.modules)
    from formula_foundry.tracking import get_tracker
    with get_tracker().start_run() as run:
        run.log_metric("m", 1.0)
        run.log_param("p", 1)
    after_run = sorted(m for m in {heavy} if m in sys.modules)
    print(json.dumps([after_import, after_run, "yaml" in sys.modules]))
"""


def test_importing_and_using_the_tracker_pulls_in_no_heavy_library(ff_project: Path) -> None:
    code = CHECK_MODULES.format(heavy=repr(HEAVY))
    after_import, after_run, yaml_loaded = json.loads(run_python(code, cwd=ff_project).stdout)
    assert after_import == []
    # Reading config/mlflow.yaml needs yaml, and nothing else heavy.
    assert after_run == ["yaml"] and yaml_loaded


def test_without_a_config_file_not_even_yaml_is_imported(tmp_path: Path) -> None:
    code = CHECK_MODULES.format(heavy=repr(HEAVY))
    _, after_run, _ = json.loads(run_python(code, cwd=tmp_path).stdout)
    assert after_run == []


SUBSTRATE_FORBIDDEN = (
    "formula_foundry.tracking",
    "formula_foundry.sync",
    "mlflow",
    "click",
    "yaml",
    "numpy",
    "torch",
)


def test_importing_substrate_pulls_in_no_upper_layer_or_heavy_library(tmp_path: Path) -> None:
    code = """
        import json, sys
        import formula_foundry.substrate
        print(json.dumps(sorted(sys.modules)))
    """
    loaded = json.loads(run_python(code, cwd=tmp_path).stdout)
    offenders = [
        m for m in loaded if any(m == f or m.startswith(f + ".") for f in SUBSTRATE_FORBIDDEN)
    ]
    assert offenders == []
    assert "formula_foundry.substrate.artifact_store" in loaded


def test_importing_the_sync_and_its_cli_imports_no_mlflow(tmp_path: Path) -> None:
    # Every module of the engine and the commands, and the adapter's module level too.
    modules = sorted(
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        for p in (SRC / "sync").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
        and rel(p) not in ONLY_IN["mlflow"] | ONLY_IN["sqlalchemy"]
    )
    code = f"""
        import importlib, json, sys
        for name in {modules!r}:
            importlib.import_module(name)
        import formula_foundry.sync.mlflow.client_sink
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")))
    """
    assert json.loads(run_python(code, cwd=tmp_path).stdout) == []


# -- public APIs ------------------------------------------------------------------------------


def test_the_tracking_api_is_curated_and_typed() -> None:
    import formula_foundry.tracking as tracking

    assert sorted(tracking.__all__) == ["Run", "Tracker", "get_tracker"]
    assert all(hasattr(tracking, name) for name in tracking.__all__)
    assert (SRC / "py.typed").is_file()


def test_the_substrate_api_is_curated() -> None:
    required = {
        "Manifest",
        "DeterminismConfig",
        "init_run_dir",
        "create_run",
        "RunArtifacts",
        "ArtifactStore",
        "ArtifactEntry",
        "Digest",
        "SubstrateError",
    }
    assert required <= set(substrate.__all__)
    assert all(hasattr(substrate, name) for name in substrate.__all__)
    assert all(getattr(substrate, name).__doc__ for name in substrate.__all__)


def test_the_sync_api_is_curated_and_documented() -> None:
    assert {"sync_once", "SyncReport", "load_sync_settings", "Sink"} <= set(sync.__all__)
    # The operations the CLI calls, one per command.
    assert {"watch", "sync_status", "verify", "collect_garbage"} <= set(sync.__all__)
    assert all(getattr(sync, name).__doc__ for name in sync.__all__)


# -- the docs ---------------------------------------------------------------------------------


def test_sync_docs_cover_every_option_and_exit_code() -> None:
    text = (DOCS / "sync.md").read_text()
    for param in main.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert f"`{opt}" in text, opt
    for code in (0, 1, 2, 75):
        assert re.search(rf"^\| `{code}` \|", text, re.M), code
    assert "quarantine.jsonl" in text and "ff.run_uuid" in text


def test_the_architecture_map_names_every_part_and_module() -> None:
    text = (DOCS / "architecture.md").read_text()
    missing = [
        rel(p)
        for p in source_files()
        if p.name not in ("__init__.py", "__main__.py") and f"`{p.stem}`" not in text
    ]
    folders = sorted({rel(p.parent) + "/" for p in source_files() if p.parent != SRC})
    missing += [f for f in folders if f"`{f}`" not in text]
    assert missing == [], "docs/architecture.md does not name these"
    # The rules in the map are the rules of these tests.
    for library, modules in ONLY_IN.items():
        assert library in text
        for module in modules:
            assert f"`{Path(module).stem}`" in text, module
