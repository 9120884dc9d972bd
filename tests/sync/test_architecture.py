"""The sync's layering: MLflow only in its adapter, click only in its CLI, a curated API, docs."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import formula_foundry.sync as sync
from formula_foundry.sync.cli import main

from .conftest import Project

SRC = Path(sync.__file__).parent
DOCS = Path(__file__).resolve().parents[2] / "docs" / "sync.md"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapter_imports_mlflow_and_only_the_cli_imports_click() -> None:
    by_module = {p.name: _imports(p) for p in SRC.glob("*.py")}
    assert {m for m, names in by_module.items() if "mlflow" in names} == {
        "mlflow_sink.py",
        "mlflow_internals.py",  # the private MLflow APIs the adapter reaches into
        "snapshot.py",  # read-only dump and reader, imported by tests and `ff-sync verify`
    }
    # `ff-sync status` must stay MLflow-free; `verify` reaches MLflow only through snapshot.
    for name in ("status.py", "verify.py", "expected.py"):
        assert "mlflow" not in by_module[name], name
    assert {m for m, names in by_module.items() if "click" in names} == {"cli.py"}
    assert not any("yaml" in names for names in by_module.values())


def test_importing_the_sync_and_its_cli_imports_no_mlflow(project: Project) -> None:
    out = project.python(
        """
        import json, sys
        import formula_foundry.sync, formula_foundry.sync.cli, formula_foundry.sync.engine
        import formula_foundry.sync.mlflow_sink  # its module level too
        import formula_foundry.sync.mlflow_internals, formula_foundry.sync.refusals
        import formula_foundry.sync.status, formula_foundry.sync.verify
        import formula_foundry.sync.expected
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")))
        """
    ).stdout
    assert json.loads(out) == []


def _modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_lower_layers_never_import_the_sync() -> None:
    for folder in ("tracking", "substrate"):
        for path in (SRC.parent / folder).glob("*.py"):
            assert not any(m.startswith("formula_foundry.sync") for m in _modules(path)), path


def test_public_api_is_curated_and_documented() -> None:
    assert {"sync_once", "SyncReport", "load_sync_settings", "Sink"} <= set(sync.__all__)
    assert all(getattr(sync, name).__doc__ for name in sync.__all__)


def test_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in SRC.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_docs_cover_every_option_and_exit_code() -> None:
    text = DOCS.read_text()
    for param in main.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert f"`{opt}" in text, opt
    for code in (0, 1, 2, 75):
        assert re.search(rf"^\| `{code}` \|", text, re.M), code
    assert "quarantine.jsonl" in text and "ff.run_uuid" in text
