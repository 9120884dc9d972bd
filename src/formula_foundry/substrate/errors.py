"""Errors raised by the substrate, each a member of a family in :mod:`formula_foundry.errors`.

Callers catch the families (``ValidationError``, ``SubstrateError``, ``DigestMismatch``,
``ArtifactNotFound``); the classes below only make the culprit explicit. Messages are one line,
name the offending value or path, and say what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from formula_foundry.errors import (
    ArtifactNotFound,
    DigestMismatch,
    SubstrateError,
    ValidationError,
)

if TYPE_CHECKING:
    from formula_foundry.substrate.digest import Digest

__all__ = [
    "ArtifactNotFound",
    "DigestMismatch",
    "InvalidDeterminismConfig",
    "InvalidDigest",
    "InvalidLogicalPath",
    "InvalidRunId",
    "ManifestError",
    "ObjectCorrupt",
    "RunDirExists",
    "SourceFileNotFound",
    "StoreFormatError",
    "StoreIOError",
    "SubstrateError",
    "UnsafeStorePath",
    "ValidationError",
]


class InvalidDigest(ValidationError):
    """A digest string is not of the form ``sha256:<64 lower-case hex digits>``."""


class InvalidLogicalPath(ValidationError):
    """A logical artifact path is not a clean relative POSIX path."""


class InvalidRunId(ValidationError):
    """A run id could escape its run root or is not portable as a directory name."""


class InvalidDeterminismConfig(ValidationError):
    """A determinism mode, seed or cuBLAS workspace setting is not valid."""


class ManifestError(SubstrateError):
    """A manifest file cannot be read or does not hold a valid manifest."""


class RunDirExists(SubstrateError, FileExistsError):
    """The run directory already holds files and ``resume=True`` was not given."""


class SourceFileNotFound(SubstrateError, FileNotFoundError):
    """The file given to :meth:`ArtifactStore.add_file` does not exist."""


class StoreIOError(SubstrateError, OSError):
    """Reading a source or writing into the artifact store failed (disk full, permissions, I/O)."""


class StoreFormatError(SubstrateError):
    """The store root was written by an unknown format version or is not a store."""


class ObjectCorrupt(DigestMismatch):
    """A stored object no longer hashes to its digest; it has been moved to quarantine."""

    def __init__(self, expected: Digest, actual: Digest, quarantined_to: Path | None) -> None:
        where = f"moved to {quarantined_to}" if quarantined_to else "already moved away"
        super().__init__(
            f"object {expected} is corrupt: its content hashes to {actual}; {where}; "
            "add the original file again to restore it"
        )
        self.expected = expected
        self.actual = actual
        self.quarantined_to = quarantined_to

    def __reduce__(self) -> tuple[type[ObjectCorrupt], tuple[Digest, Digest, Path | None]]:
        # Needed so the error survives multiprocessing (custom __init__ signature).
        return (type(self), (self.expected, self.actual, self.quarantined_to))


class UnsafeStorePath(SubstrateError):
    """A path inside the artifact store is a symbolic link (or not the kind of file the layout
    expects); the store never follows, serves or writes through it. ``.path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"{path} {problem}; the artifact store never follows or serves it: remove it, "
            "then add the original file again"
        )
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[type[UnsafeStorePath], tuple[Path, str]]:
        return (type(self), (self.path, self.problem))
