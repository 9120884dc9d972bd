"""The run manifest: what code, design, environment and seeds produced a run.

File format (``manifest.json``): the canonical JSON of :meth:`Manifest.to_dict` — sorted keys,
compact, UTF-8, no trailing newline — so ``sha256sum manifest.json`` equals
``Manifest.digest``. Top-level ``kind`` and ``schema_version`` identify the format; a reader
rejects other kinds and versions it does not know. The manifest holds no timestamp on purpose:
the same code, design document, environment and seeds always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from formula_foundry.substrate import canonical_json
from formula_foundry.substrate.atomic import atomic_write_bytes
from formula_foundry.substrate.determinism import MODES, DeterminismConfig, derive_seed
from formula_foundry.substrate.digest import Digest
from formula_foundry.substrate.environment import (
    EnvironmentInfo,
    describe_environment,
    design_doc_info,
    find_project_root,
    git_info,
)
from formula_foundry.substrate.errors import ManifestError

__all__ = ["MANIFEST_KIND", "MANIFEST_SCHEMA_VERSION", "Manifest"]

MANIFEST_KIND: Final = "formula-foundry/manifest"
MANIFEST_SCHEMA_VERSION: Final = 1
# Loading refuses anything bigger: a manifest is a few KiB; a huge file is not one.
_MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    """Provenance of a run. Build with :meth:`from_environment`; persist with :meth:`write`.

    Fields:
      * ``git_sha`` — 40-hex commit of HEAD, or ``"unknown"``;
        ``git_status`` — ``clean``/``dirty``/``no-commits``/``not-a-repository``/
        ``git-unavailable``/``error``.
      * ``design_doc_path``, ``design_doc_status`` (``present``/``missing``) and
        ``design_doc_sha256`` — hex digest, or ``"missing:<path>"``.
      * ``environment_fingerprint`` — ``sha256:<hex>`` over ``environment``
        (interpreter, platform, distributions).
      * ``determinism_mode``, ``seed`` (base), ``seeds`` (one per PRNG),
        ``cublas_workspace_config`` (the value strict mode applies).
    """

    git_sha: str
    git_status: str
    design_doc_path: str
    design_doc_status: str
    design_doc_sha256: str
    environment_fingerprint: str
    environment: EnvironmentInfo
    determinism_mode: str
    seed: int | None = None
    seeds: Mapping[str, int] = field(default_factory=dict)
    cublas_workspace_config: str | None = None

    @classmethod
    def from_environment(
        cls,
        *,
        determinism: DeterminismConfig | None = None,
        design_doc: str | os.PathLike[str] | None = None,
        project_root: str | os.PathLike[str] | None = None,
        distributions: Iterable[tuple[str, str]] | None = None,
    ) -> Manifest:
        """Describe the current process.

        ``determinism`` defaults to ``DeterminismConfig(mode="off")``. ``project_root``
        defaults to the nearest ancestor of cwd holding ``config/`` or ``.git``.
        ``distributions`` replaces the installed ``(name, version)`` list (tests, or a lock
        file's view). Runs ``git`` locally with a timeout; needs no network.
        """
        config = determinism if determinism is not None else DeterminismConfig(mode="off")
        root = Path(project_root).resolve() if project_root is not None else find_project_root()
        git = git_info(root)
        doc = design_doc_info(design_doc, project_root=root)
        env = describe_environment(distributions)
        return cls(
            git_sha=git.sha,
            git_status=git.status,
            design_doc_path=doc.path,
            design_doc_status=doc.status,
            design_doc_sha256=doc.sha256,
            environment_fingerprint=str(env.fingerprint),
            environment=env,
            determinism_mode=config.mode,
            seed=config.seed,
            seeds=config.seeds,
            cublas_workspace_config=config.effective_cublas_workspace_config,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, including ``kind`` and ``schema_version``."""
        return {
            "kind": MANIFEST_KIND,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "git_sha": self.git_sha,
            "git_status": self.git_status,
            "design_doc_path": self.design_doc_path,
            "design_doc_status": self.design_doc_status,
            "design_doc_sha256": self.design_doc_sha256,
            "environment_fingerprint": self.environment_fingerprint,
            "environment": self.environment.to_dict(),
            "determinism_mode": self.determinism_mode,
            "seed": self.seed,
            "seeds": dict(self.seeds),
            "cublas_workspace_config": self.cublas_workspace_config,
        }

    def canonical_bytes(self) -> bytes:
        """The canonical JSON bytes; equal manifests give equal bytes in any process."""
        return canonical_json.dumps(self.to_dict())

    @property
    def digest(self) -> Digest:
        """SHA-256 of :meth:`canonical_bytes` (equals the hash of the written file)."""
        return Digest(hashlib.sha256(self.canonical_bytes()).hexdigest())

    def to_tags(self) -> dict[str, str]:
        """Tracking tags: ``git_sha``, ``design_doc_sha256``, ``environment_fingerprint``,
        ``determinism_mode`` and ``seed_<prng>`` for each PRNG seed."""
        tags = {
            "git_sha": self.git_sha,
            "design_doc_sha256": self.design_doc_sha256,
            "environment_fingerprint": self.environment_fingerprint,
            "determinism_mode": self.determinism_mode,
        }
        tags.update({f"seed_{name}": str(value) for name, value in sorted(self.seeds.items())})
        return tags

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the canonical bytes to ``path`` atomically and durably."""
        atomic_write_bytes(path, self.canonical_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest written by :meth:`write`; :class:`ManifestError` names the problem."""
        source = Path(path)
        try:
            with source.open("rb") as f:
                raw = f.read(_MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest {source} does not exist") from exc
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {source}: {exc.strerror}") from exc
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest {source} is larger than 16 MiB; not a manifest")
        try:
            data = canonical_json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"manifest {source} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(source))

    @classmethod
    def from_dict(cls, data: object, *, source: str = "<dict>") -> Manifest:
        """Validate and rebuild a manifest from :meth:`to_dict` output."""
        return _parse(data, source)


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], src: str) -> Any:
    if key not in data:
        raise ManifestError(f"manifest {src}: field {key!r} is missing")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a JSON true is never a valid seed or count.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ManifestError(f"manifest {src}: field {key!r} has invalid value {value!r}")
    return value


def _parse(data: object, src: str) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {src}: expected a JSON object")
    if data.get("kind") != MANIFEST_KIND:
        raise ManifestError(f"manifest {src}: kind {data.get('kind')!r} is not {MANIFEST_KIND!r}")
    version = data.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"manifest {src}: schema_version {version!r} is not supported "
            f"(this release reads {MANIFEST_SCHEMA_VERSION}); upgrade formula-foundry"
        )
    env_raw = _require(data, "environment", dict, src)
    try:
        distributions = tuple(
            (str(name), str(dist_version))
            for name, dist_version in _require(env_raw, "distributions", list, src)
        )
        env = EnvironmentInfo(
            python_implementation=_require(env_raw, "python_implementation", str, src),
            python_version=_require(env_raw, "python_version", str, src),
            platform=_require(env_raw, "platform", str, src),
            machine=_require(env_raw, "machine", str, src),
            distributions=distributions,
        )
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest {src}: field 'environment' is malformed") from exc
    fingerprint = _require(data, "environment_fingerprint", str, src)
    if fingerprint != str(env.fingerprint):
        raise ManifestError(
            f"manifest {src}: environment_fingerprint {fingerprint} does not match its "
            f"environment ({env.fingerprint}); the file was edited or corrupted"
        )
    mode = _require(data, "determinism_mode", str, src)
    if mode not in MODES:
        raise ManifestError(f"manifest {src}: determinism_mode {mode!r} is unknown")
    seed = _require(data, "seed", (int, type(None)), src)
    seeds = _require(data, "seeds", dict, src)
    for name, value in seeds.items():
        if seed is None or value != derive_seed(seed, name):
            raise ManifestError(
                f"manifest {src}: seeds[{name!r}]={value!r} is not derived from seed"
            )
    return Manifest(
        git_sha=_require(data, "git_sha", str, src),
        git_status=_require(data, "git_status", str, src),
        design_doc_path=_require(data, "design_doc_path", str, src),
        design_doc_status=_require(data, "design_doc_status", str, src),
        design_doc_sha256=_require(data, "design_doc_sha256", str, src),
        environment_fingerprint=fingerprint,
        environment=env,
        determinism_mode=mode,
        seed=seed,
        seeds=dict(seeds),
        cublas_workspace_config=_require(data, "cublas_workspace_config", (str, type(None)), src),
    )
