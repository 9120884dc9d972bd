"""Logical artifact paths: the names under which artifacts are referenced and materialised.

A logical path must be safe to join under any directory on any OS, so only clean relative
POSIX paths are accepted; anything that could climb out, alias another path or be read
differently on Windows is refused with a message naming the path.
"""

from __future__ import annotations

import re
from typing import Final

from formula_foundry.substrate.errors import InvalidLogicalPath

__all__ = ["MAX_COMPONENT_BYTES", "MAX_LOGICAL_PATH_LENGTH", "validate_logical_path"]

MAX_LOGICAL_PATH_LENGTH: Final = 4096
# NAME_MAX of every common filesystem: a longer component can never be created as a file.
MAX_COMPONENT_BYTES: Final = 255
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE: Final = re.compile(r"[A-Za-z]:")


def validate_logical_path(logical_path: object) -> str:
    """Return ``logical_path`` if it is a clean relative POSIX path, else raise
    :class:`InvalidLogicalPath` naming it.

    Refused: non-str, empty, absolute, drive-prefixed (``C:``), backslashes, control characters
    (NUL included), text that is not valid Unicode (lone surrogates), empty, ``.`` or ``..``
    components (so ``a//b`` and ``a/`` too), and components longer than 255 bytes in UTF-8.
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
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"it is not valid Unicode text (lone surrogate at index {exc.start})"
    for part in path.split("/"):
        if not part:
            return "it has an empty component"
        if part in (".", ".."):
            return f"it has a {part!r} component"
        size = len(part.encode("utf-8"))
        if size > MAX_COMPONENT_BYTES:
            return (
                f"component {part[:20]!r}... is {size} bytes in UTF-8 (file systems allow "
                f"at most {MAX_COMPONENT_BYTES})"
            )
    return None
