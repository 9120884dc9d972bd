"""Hide credentials in URIs before they reach a log line, an error or status output."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*):[^@/]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret)=)[^&]*")


def redact_uri(uri: str) -> str:
    """Return ``uri`` with any password (userinfo or query parameter) replaced by ``***``."""
    out = _USERINFO.sub(r"\g<scheme>\g<user>:***@", uri)
    return _QUERY_SECRET.sub(r"\1***", out)
