"""The one exception root of formula-foundry and its families.

Every error the package raises on purpose derives from :class:`FormulaFoundryError`.
Messages are one line, name the culprit (run, key, path, digest) and say what to do.
``exit_code`` is what ``ff-sync`` exits with when the error reaches the command line;
the CLI maps errors to exit codes in one place by reading this attribute.
"""

from __future__ import annotations

# Exit codes of ff-sync, documented in docs/cli.md.
EXIT_OK = 0
EXIT_PARTIAL = 1  # done, but some records were quarantined or in conflict
EXIT_USAGE = 2  # usage or configuration error
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL: destination unavailable, try again later


class FormulaFoundryError(Exception):
    """Root of every error raised by formula-foundry."""

    exit_code: int = EXIT_USAGE


class ConfigError(FormulaFoundryError, ValueError):
    """The configuration file or an environment override is invalid."""


class ValidationError(FormulaFoundryError, ValueError):
    """A value passed to the public API breaks a rule (MLflow's or ours)."""


class RunStateError(FormulaFoundryError, RuntimeError):
    """An operation does not fit the run's state (e.g. logging on an ended run)."""


class ParamConflictError(ValidationError):
    """A param was logged again with a different value."""


class SpoolError(FormulaFoundryError):
    """Root of errors about spool segments."""


class SpoolWriteError(SpoolError, OSError):
    """An event could not be written to its segment (disk full, quota, I/O error)."""


class UnsupportedSpoolVersion(SpoolError):
    """A segment was written in a format version this release cannot read."""


class SpoolCorrupt(SpoolError):
    """A segment holds data that is not a valid event."""


class SubstrateError(FormulaFoundryError):
    """Root of errors from the substrate (manifest, run dirs, artifact store)."""


class DigestMismatch(SubstrateError):
    """Stored content does not hash to its digest."""


class ArtifactNotFound(SubstrateError, FileNotFoundError):
    """No object with that digest is in the store."""


class SyncError(FormulaFoundryError):
    """Root of errors of ff-sync."""


class MlflowMissing(SyncError):
    """MLflow is not installed on this host."""

    exit_code = EXIT_USAGE


class StoreUnavailable(SyncError):
    """The destination tracking store cannot be reached or is locked; try again later."""

    exit_code = EXIT_UNAVAILABLE


class SyncLocked(SyncError):
    """Another ff-sync holds the lock for this destination."""

    exit_code = EXIT_UNAVAILABLE
