"""The substrate is the bottom layer: it imports no upper layer and no optional heavy library."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import formula_foundry.substrate as substrate

if TYPE_CHECKING:
    from .conftest import RunPython

FORBIDDEN = (
    "formula_foundry.tracking",
    "formula_foundry.sync",
    "mlflow",
    "click",
    "yaml",
    "numpy",
    "torch",
)


def test_importing_substrate_pulls_in_no_upper_layer_or_heavy_library(
    run_python: RunPython,
) -> None:
    result = run_python(
        """
        import json, sys
        import formula_foundry.substrate
        print(json.dumps(sorted(sys.modules)))
        """
    )
    loaded = json.loads(result.stdout)
    offenders = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert offenders == []
    assert "formula_foundry.substrate.artifact_store" in loaded


def test_public_api_is_curated() -> None:
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
