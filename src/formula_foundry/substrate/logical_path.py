"""Logical artifact paths: the names under which artifacts are referenced and materialised.

A logical path must be safe to join under any directory on any OS, so only clean relative
POSIX paths are accepted; anything that could climb out, alias another path or be read
differently on Windows is refused with a message naming the path.
"""

from __future__ import annotations

import re
from typing import Final

from formula_foundry.substrate.errors import InvalidLogicalPath

__all__ = ["MAX_LOGICAL_PATH_LENGTH", "validate_logical_path"]

MAX_LOGICAL_PATH_LENGTH: Final = 4096
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE: Final = re.compile(r"[A-Za-z]:")


def validate_logical_path(logical_path: object) -> str:
    """Return ``logical_path`` if it is a clean relative POSIX path, else raise
    :class:`InvalidLogicalPath` naming it.

    Refused: non-str, empty, absolute, drive-prefixed (``C:``), backslashes, control characters
    (NUL included), and empty, ``.`` or ``..`` components (so ``a//b`` and ``a/`` too).
    """
    if not isinstance(logical_path, str):
        raise InvalidLogicalPath(f"invalid logical path {logical_path!r}: expected a str")
    reason = _logical_path_problem(logical_path)
    if reason:
        raise InvalidLogicalPath(
            f"invalid logical path {logical_path!r}: {reason}; use a relative POSIX path "
            "like 'dir/file.ext'"
        )
    return logical_path


def _logical_path_problem(path: str) -> str | None:
    if not path:
        return "it is empty"
    if len(path) > MAX_LOGICAL_PATH_LENGTH:
        return f"longer than {MAX_LOGICAL_PATH_LENGTH} characters"
    if _CONTROL_CHARS.search(path):
        return "it contains a control character"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/"):
        return "it is absolute"
    if _DRIVE.match(path):
        return "it starts with a drive letter"
    for part in path.split("/"):
        if not part:
            return "it has an empty component"
        if part in (".", ".."):
            return f"it has a {part!r} component"
    return None
