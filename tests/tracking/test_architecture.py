"""Guards of the architecture: cheap imports on compute nodes, heavy libraries in one place each."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import formula_foundry

from ._helpers import run_python

SRC = Path(formula_foundry.__file__).resolve().parent  # src/formula_foundry

# Third-party modules allowed in exactly one module each (paths relative to SRC). The rule
# holds whether or not the allowed module exists yet.
ONLY_IN = {
    "yaml": {"config.py"},
    "click": {"sync/cli.py"},
    # The MLflow adapters: mlflow_sink writes (mlflow_internals: the private APIs it reaches
    # into), snapshot reads (for tests and verify).
    "mlflow": {
        "sync/mlflow_sink.py",
        "sync/mlflow_internals.py",
        "sync/snapshot.py",
        # The drop-in implements MLflow's store interfaces: only these two modules of it.
        "dropin/store.py",
        "dropin/registry.py",
    },
}
HEAVY = ("mlflow", "yaml", "click", "numpy", "pandas", "sqlalchemy", "torch")


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


def test_the_scan_sees_imports_inside_functions_and_relative_ones() -> None:
    # The scanner itself must be able to find what the rules forbid.
    tracker = imported_modules(SRC / "tracking" / "tracker.py")
    assert "formula_foundry.config" in tracker  # imported inside get_tracker()
    assert "formula_foundry.substrate" in tracker  # imported inside log_artifact_reference()
    assert "yaml" in imported_modules(SRC / "config.py")  # imported inside _read_values()


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_each_heavy_library_is_imported_by_one_module_only(library: str) -> None:
    offenders = []
    for path in source_files():
        mods = imported_modules(path)
        if any(m == library or m.startswith(library + ".") for m in mods):
            rel = path.relative_to(SRC).as_posix()
            if rel not in ONLY_IN[library]:
                offenders.append(rel)
    assert offenders == [], f"{library} may only be imported by {sorted(ONLY_IN[library])}"


def test_lower_layers_never_import_upper_ones() -> None:
    rules = {
        "substrate/": (
            "formula_foundry.tracking",
            "formula_foundry.sync",
            "formula_foundry.dropin",
        ),
        "tracking/": ("formula_foundry.sync", "formula_foundry.dropin"),
        # The drop-in is a producer beside the tracker: MLflow loads it, nothing of ours does.
        "sync/": ("formula_foundry.dropin",),
        "errors.py": ("formula_foundry.",),
        "config.py": (
            "formula_foundry.tracking",
            "formula_foundry.sync",
            "formula_foundry.substrate",
            "formula_foundry.dropin",
        ),
    }
    offenders = []
    for path in source_files():
        rel = path.relative_to(SRC).as_posix()
        for prefix, forbidden in rules.items():
            if rel.startswith(prefix):
                bad = sorted(
                    m
                    for m in imported_modules(path)
                    if m.startswith(forbidden) and m not in ("formula_foundry.errors",)
                )
                if bad:
                    offenders.append((rel, bad))
    assert offenders == []


def test_the_tracking_package_checks_data_without_assert() -> None:
    # `python -O` removes asserts; a data check must survive it.
    for path in sorted((SRC / "tracking").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert asserts == [], f"{path.name} uses assert on lines {asserts}"


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


def test_the_public_api_is_curated_and_typed() -> None:
    import formula_foundry.tracking as tracking

    assert sorted(tracking.__all__) == ["Run", "Tracker", "get_tracker"]
    assert all(hasattr(tracking, name) for name in tracking.__all__)
    assert (SRC / "py.typed").is_file()
