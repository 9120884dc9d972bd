"""Facts about where a run happens: project root, git state, design document, environment.

Everything here works offline and outside a git repository; what cannot be determined is stated
explicitly (``git_status="not-a-repository"``, ``design_doc_status="missing"``), never guessed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from formula_foundry.substrate import canonical_json
from formula_foundry.substrate.digest import Digest, sha256_file
from formula_foundry.substrate.errors import ValidationError

__all__ = [
    "DEFAULT_DESIGN_DOC",
    "DESIGN_DOC_ENV",
    "DesignDocInfo",
    "EnvironmentInfo",
    "GitInfo",
    "GitStatus",
    "describe_environment",
    "design_doc_info",
    "find_project_root",
    "git_info",
    "installed_distributions",
    "normalize_distribution_name",
]

DESIGN_DOC_ENV: Final = "FF_DESIGN_DOC"
DEFAULT_DESIGN_DOC: Final = Path("docs") / "design.md"
GIT_TIMEOUT_S: Final = 10.0
_FINGERPRINT_SCHEMA: Final = "formula-foundry/environment-fingerprint/v1"

GitStatus = Literal["clean", "dirty", "no-commits", "not-a-repository", "git-unavailable", "error"]


def find_project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """Nearest ancestor of ``start`` (default: cwd) holding ``config/`` or ``.git``.

    Falls back to ``start`` itself, so a bare directory still gets a well-defined root.
    """
    here = Path(start if start is not None else Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "config").is_dir() or (candidate / ".git").exists():
            return candidate
    return here


@dataclass(frozen=True)
class GitInfo:
    """``sha`` is the 40-hex commit of HEAD or ``"unknown"``; ``status`` says why/how."""

    sha: str
    status: GitStatus


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Never prompt, never take index.lock (another process may be committing), stay local.
    env.update(GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    return subprocess.run(
        ["git", *args],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=False,
    )


def git_info(root: str | os.PathLike[str]) -> GitInfo:
    """Commit and cleanliness of the work tree at ``root``.

    Dirty means tracked files differ from HEAD; untracked files (run outputs, caches) do not
    count, matching ``git describe --dirty``.
    """
    root_path = Path(root)
    try:
        inside = _git(root_path, "rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            if "not a git repository" in inside.stderr.lower() or inside.returncode == 0:
                return GitInfo("unknown", "not-a-repository")
            return GitInfo("unknown", "error")
        head = _git(root_path, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        if head.returncode != 0:
            return GitInfo("unknown", "no-commits")
        sha = head.stdout.strip()
        status = _git(root_path, "status", "--porcelain", "--untracked-files=no")
        if status.returncode != 0:
            return GitInfo(sha, "error")
        return GitInfo(sha, "dirty" if status.stdout.strip() else "clean")
    except FileNotFoundError:
        return GitInfo("unknown", "git-unavailable")
    except (subprocess.TimeoutExpired, OSError):
        return GitInfo("unknown", "error")


@dataclass(frozen=True)
class DesignDocInfo:
    """``sha256`` is the hex digest, or ``"missing:<path>"`` when the file does not exist."""

    path: str
    status: Literal["present", "missing"]
    sha256: str


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def design_doc_info(
    design_doc: str | os.PathLike[str] | None = None, *, project_root: Path | None = None
) -> DesignDocInfo:
    """Hash the design document.

    Path resolution: ``design_doc`` (relative to cwd), else ``$FF_DESIGN_DOC`` (relative to the
    project root, so job scripts may run from anywhere), else ``docs/design.md`` under the root.
    The recorded path is relative to the project root when the file lies inside it.
    """
    root = project_root if project_root is not None else find_project_root()
    if design_doc is not None:
        path = Path(design_doc).absolute()
    elif os.environ.get(DESIGN_DOC_ENV):
        path = root / os.environ[DESIGN_DOC_ENV]
    else:
        path = root / DEFAULT_DESIGN_DOC
    shown = _display_path(path, root)
    try:
        digest, _ = sha256_file(path)
    except FileNotFoundError:
        return DesignDocInfo(shown, "missing", f"missing:{shown}")
    except IsADirectoryError as exc:
        raise ValidationError(f"design document {shown!r} is a directory; pass a file") from exc
    return DesignDocInfo(shown, "present", digest.hexdigest)


def normalize_distribution_name(name: str) -> str:
    """PEP 503 normalisation, so ``Foo_Bar`` and ``foo-bar`` fingerprint alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> list[tuple[str, str]]:
    """``(normalised name, version)`` of every distribution importlib.metadata can see, sorted."""
    found: set[tuple[str, str]] = set()
    for dist in importlib.metadata.distributions():
        try:
            name: str | None = dist.metadata["Name"]
        except KeyError:  # Python 3.14 raises for a missing header; older versions return None
            name = None
        if name:
            found.add((normalize_distribution_name(name), dist.version or ""))
    return sorted(found)


@dataclass(frozen=True)
class EnvironmentInfo:
    """The inputs of the environment fingerprint, kept so a manifest can be re-checked.

    ``platform`` is ``sys.platform`` and ``machine`` the CPU architecture; the kernel release is
    left out on purpose so identical software on differently patched nodes fingerprints alike.
    """

    python_implementation: str
    python_version: str
    platform: str
    machine: str
    distributions: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (distributions as ``[name, version]`` pairs)."""
        return {
            "python_implementation": self.python_implementation,
            "python_version": self.python_version,
            "platform": self.platform,
            "machine": self.machine,
            "distributions": [list(pair) for pair in self.distributions],
        }

    @property
    def fingerprint(self) -> Digest:
        """SHA-256 over the canonical JSON of :meth:`to_dict` plus a schema label."""
        payload = {"schema": _FINGERPRINT_SCHEMA, **self.to_dict()}
        return Digest(hashlib.sha256(canonical_json.dumps(payload)).hexdigest())


def describe_environment(
    distributions: Iterable[tuple[str, str]] | None = None,
) -> EnvironmentInfo:
    """The current interpreter and platform, with ``distributions`` or the installed ones.

    Names are normalised and the list sorted and de-duplicated, so order never matters.
    """
    pairs = installed_distributions() if distributions is None else distributions
    normalized = sorted({(normalize_distribution_name(n), str(v)) for n, v in pairs})
    version = sys.version_info
    return EnvironmentInfo(
        python_implementation=sys.implementation.name,
        python_version=f"{version.major}.{version.minor}.{version.micro}"
        + ("" if version.releaselevel == "final" else f"{version.releaselevel}{version.serial}"),
        platform=sys.platform,
        machine=platform.machine(),
        distributions=tuple(normalized),
    )
