"""The substrate: manifests, determinism, run directories and the content-addressed store.

Everything a run needs to be reproducible and its outputs addressable, with no dependency on
tracking, MLflow, click or YAML. See ``docs/substrate.md``.
"""

from formula_foundry.substrate.artifact_store import (
    ArtifactEntry,
    ArtifactStore,
    DamagedObject,
    StoreVerifyReport,
)
from formula_foundry.substrate.determinism import AppliedDeterminism, DeterminismConfig
from formula_foundry.substrate.digest import Digest
from formula_foundry.substrate.errors import (
    ArtifactNotFound,
    DigestMismatch,
    InvalidDeterminismConfig,
    InvalidDigest,
    InvalidLogicalPath,
    InvalidRunId,
    ManifestError,
    ObjectCorrupt,
    RunDirExists,
    SourceFileNotFound,
    StoreFormatError,
    StoreIOError,
    SubstrateError,
    UnsafeStorePath,
    ValidationError,
)
from formula_foundry.substrate.logical_path import validate_logical_path
from formula_foundry.substrate.manifest import Manifest
from formula_foundry.substrate.run_dir import (
    RunArtifacts,
    create_run,
    init_run_dir,
    new_run_id,
    validate_run_id,
)

__all__ = [
    "AppliedDeterminism",
    "ArtifactEntry",
    "ArtifactNotFound",
    "ArtifactStore",
    "DamagedObject",
    "DeterminismConfig",
    "Digest",
    "DigestMismatch",
    "InvalidDeterminismConfig",
    "InvalidDigest",
    "InvalidLogicalPath",
    "InvalidRunId",
    "Manifest",
    "ManifestError",
    "ObjectCorrupt",
    "RunArtifacts",
    "RunDirExists",
    "SourceFileNotFound",
    "StoreFormatError",
    "StoreIOError",
    "StoreVerifyReport",
    "SubstrateError",
    "UnsafeStorePath",
    "ValidationError",
    "create_run",
    "init_run_dir",
    "new_run_id",
    "validate_logical_path",
    "validate_run_id",
]
