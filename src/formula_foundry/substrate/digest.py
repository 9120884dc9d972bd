"""Content digests: the :class:`Digest` value object and streaming hashing.

The only algorithm is SHA-256 and the only text form is ``sha256:<64 lower-case hex digits>``;
one spelling per digest keeps digests comparable as plain strings (tags, file names, JSON).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeAlias

from formula_foundry.substrate.errors import InvalidDigest

__all__ = [
    "ALGORITHM",
    "CHUNK_SIZE",
    "BytesLike",
    "Digest",
    "SupportsReadinto",
    "sha256_file",
    "sha256_stream",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview

ALGORITHM: Final = "sha256"
# 4 MiB: per-call overhead vanishes next to hashing, yet the buffer still fits in L2/L3.
CHUNK_SIZE: Final = 4 * 1024 * 1024

_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A SHA-256 content digest; ``str(digest)`` is ``sha256:<hex>``.

    Build one with :meth:`parse` (from text), :meth:`of_bytes` or :func:`sha256_file`.
    """

    hexdigest: str
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        if self.algorithm != ALGORITHM:
            raise InvalidDigest(
                f"unsupported digest algorithm {self.algorithm!r}; only {ALGORITHM!r} is supported"
            )
        if not isinstance(self.hexdigest, str) or _HEX_RE.fullmatch(self.hexdigest) is None:
            raise InvalidDigest(
                f"invalid sha256 hex digest {self.hexdigest!r}; expected 64 lower-case hex digits"
            )

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 lower-case hex digits>``; raise :class:`InvalidDigest` otherwise."""
        if not isinstance(text, str):
            raise InvalidDigest(f"invalid digest {text!r}: expected a str like 'sha256:<hex>'")
        algorithm, sep, hexdigest = text.partition(":")
        if not sep or algorithm != ALGORITHM or _HEX_RE.fullmatch(hexdigest) is None:
            raise InvalidDigest(
                f"invalid digest {text!r}: expected 'sha256:' followed by 64 lower-case hex digits"
            )
        return cls(hexdigest)

    @classmethod
    def coerce(cls, value: Digest | str) -> Digest:
        """Return ``value`` if it is a :class:`Digest`, else parse it."""
        return value if isinstance(value, Digest) else cls.parse(value)

    @classmethod
    def of_bytes(cls, data: BytesLike) -> Digest:
        """Digest of an in-memory buffer."""
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


class SupportsReadinto(Protocol):
    """A binary stream that can fill a caller's buffer (raw files, ``BufferedReader``)."""

    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


def sha256_stream(stream: SupportsReadinto) -> tuple[Digest, int]:
    """Hash what is left of a binary stream in constant memory; return digest and byte count."""
    hasher = hashlib.sha256()
    view = memoryview(bytearray(CHUNK_SIZE))
    size = 0
    while n := stream.readinto(view):
        hasher.update(view[:n])
        size += n
    return Digest(hasher.hexdigest()), size


def sha256_file(path: str | os.PathLike[str]) -> tuple[Digest, int]:
    """Stream ``path`` through SHA-256 in constant memory; return its digest and size."""
    with Path(path).open("rb", buffering=0) as f:
        return sha256_stream(f)
