"""The one JSON encoder for anything that is hashed or compared as bytes.

``dumps`` sorts keys and emits compact UTF-8 with no trailing newline, so equal values always
give equal bytes, whatever the dict insertion order or the process that built them.
"""

from __future__ import annotations

from typing import Any

import orjson

from formula_foundry.errors import ValidationError

__all__ = ["dumps", "loads"]

_OPTIONS = orjson.OPT_SORT_KEYS


def dumps(value: object) -> bytes:
    """Canonical JSON bytes of ``value`` (sorted keys, compact, UTF-8)."""
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise ValidationError(f"value cannot be encoded as canonical JSON: {exc}") from exc


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON text; raises :class:`orjson.JSONDecodeError` (a ``ValueError``) if invalid."""
    return orjson.loads(data)
