"""Which failures of a destination are refusals of one record, not outages; and how a
refusal quotes a long name without losing the reason that follows it. No MLflow import: it
reads exceptions and their text only.
"""

from __future__ import annotations

import errno
import re

from formula_foundry.sync.engine.report import one_line

# A document that cannot be written for these reasons never will be: the record is refused,
# the pass goes on (ENOSPC, EIO and the like stay outages: waiting may fix them).
LOCAL_ERRNOS = frozenset(
    {
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.EACCES,
        errno.EPERM,
        errno.EINVAL,
        errno.ELOOP,
    }
)
# A refusal of one request by a server (not a login, a timeout or a rate limit).
CLIENT_ERROR = re.compile(r"(?:error code|status code|status)[: ]+4(?!0[138]|29)\d\d\b", re.I)
_LONG_QUOTED = re.compile(r"'([^']{81,})'")


def quoted(name: str, limit: int = 80) -> str:
    """``repr(name)``, its middle left out when longer than ``limit``: a refusal quoting a
    600-character name must still show the reason that follows it."""
    if len(name) <= limit:
        return repr(name)
    return repr(f"{name[: limit * 2 // 3]}…{name[-(limit // 4) :]}") + f" ({len(name)} chars)"


def shorten_quoted(text: str) -> str:
    """``text`` with every long single-quoted name in it shortened (see :func:`quoted`)."""
    return _LONG_QUOTED.sub(lambda m: quoted(m.group(1)), text)


def local_refusal(exc: BaseException) -> str | None:
    """The reason a document can never be written (see :data:`LOCAL_ERRNOS`), or ``None``."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in LOCAL_ERRNOS:
            return seen.strerror or errno.errorcode.get(seen.errno or 0, str(seen))
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if getattr(exc, "error_code", None) not in {"PERMISSION_DENIED", "UNAUTHENTICATED"} and (
        CLIENT_ERROR.search(text)
    ):
        return one_line(shorten_quoted(text.strip().splitlines()[0]), limit=300)
    return None
