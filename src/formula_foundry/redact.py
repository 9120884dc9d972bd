"""Hide credentials in URIs before they reach a log line, an error, status output or a file.

Parsers disagree on where a password ends: SQLAlchemy (``postgresql://``) ends it at the
first ``@`` after ``user:`` and lets it hold ``/ ? # :``; ``urllib`` (``http(s)://``) at the
last ``@`` before the first ``/ ? #``; libpq at the first ``@`` or ``/``. A password written
raw may hold any of these. So the userinfo password is taken to run from the first ``:``
after the user name to the LAST ``@`` of the URI: whatever any driver may read as a password
is hidden, and the user name and the host after that ``@`` stay visible. When a path or query
holds an ``@`` too, more than the password is hidden; that is the safe side.

Also hidden: the value of any parameter whose name looks secret (``password``, ``pwd``,
``token``, ``secret``, ``api_key``, ``sslpassword``, ...), in a query string or in a libpq
keyword DSN (``host=h password='a b'``); and malformed URIs with one slash, none, or three
(``postgresql:/u:pw@host``), which a driver might still read.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

MASK = "***"

# ``scheme:`` then any number of slashes, then ``user:password@``. The user name holds no
# ':' or '/' (SQLAlchemy's rule; it may hold '@'); the greedy password runs to the last '@'.
_USERINFO = re.compile(
    r"\A(?P<head>\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?P<slashes>/*))"
    r"(?P<user>[^:/]*):(?P<password>.*)@",
    re.DOTALL,
)
# A parameter name that looks secret: password, passwd, pwd, sslpassword, passfile, token,
# access_token, secret, client_secret, api_key, apikey, sslkey, auth, credentials, sig(nature).
_SECRET_NAME = re.compile(r"(?i)pass|pwd|token|secret|key|auth|credential|signature|\Asig\Z")
_QUOTED = r"'(?:[^'\\]++|\\.)*+'|\"(?:[^\"\\]++|\\.)*+\""
# ``name=value`` in one URI or DSN. The value runs to the next ``&name=`` / ``;name=`` /
# `` name=`` or the end: a raw '&' or space may belong to a password. Possessive quantifiers
# and the lookbehinds keep every scan linear.
_PARAM = re.compile(
    r"(?P<key>(?<![^\s?&;])(?P<name>[\w.\-]++)\s*+=\s*+)"
    rf"(?P<value>(?:{_QUOTED})(?=[\s&;]|\Z)"
    r"|[\s\S]*?(?:(?<![\s&;])(?=[\s&;]++[\w.\-]++\s*+=)|\Z))"
)
# ``name=value`` in free text: the value ends at a space, '&', ';', ',' or quote unless quoted.
_TEXT_PARAM = re.compile(
    r"(?P<key>(?<![^\s?&;,(])(?P<name>[\w.\-]++)\s*+=\s*+)"
    rf"(?P<value>{_QUOTED}|[^\s&;,'\"]*+)"
)


def _userinfo(uri: str) -> re.Match[str] | None:
    m = _USERINFO.match(uri)
    if m is None:
        return None
    # ``sqlite:////abs/a:b@c.db``, ``file:///C:/x@y``: three slashes open a file path.
    scheme = m.group("scheme").lower()
    if len(m.group("slashes")) >= 3 and scheme.split("+")[0] in ("sqlite", "file"):
        return None
    return m


def _secret_spans(uri: str) -> list[tuple[int, int]]:
    """Where ``uri``'s userinfo password and secret parameter values are, in order. Both are
    found in the whole URI, so a value holding an '@' (which the userinfo runs to) is hidden
    whole; overlapping or touching spans merge, as they may be one secret."""
    spans: list[tuple[int, int]] = []
    m = _userinfo(uri)
    if m is not None:
        spans.append(m.span("password"))
    elif "://" not in uri and (at := uri.rfind("@")) > 0 and "=" not in uri[:at]:
        # No scheme at all (a typo like ``admin:S3cret@host/db``; not a keyword DSN, whose
        # parameters are found below): what stands between the first ':' and the last '@'
        # may be a password.
        colon = uri.find(":", 0, at)
        spans.append((colon + 1 if colon >= 0 else 0, at))
    spans += [p.span("value") for p in _PARAM.finditer(uri) if _SECRET_NAME.search(p["name"])]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact_uri(uri: str) -> str:
    """``uri`` with every password (userinfo, secret parameter, libpq keyword) as ``***``."""
    parts: list[str] = []
    pos = 0
    for start, end in _secret_spans(uri):
        parts += [uri[pos:start], MASK]
        pos = end
    parts.append(uri[pos:])
    return "".join(parts)


def redact_text(text: str) -> str:
    """``text`` with the values of secret-looking ``name=value`` pairs as ``***``."""
    return _TEXT_PARAM.sub(
        lambda p: p["key"] + MASK if _SECRET_NAME.search(p["name"]) else p[0], text
    )


def uri_secrets(uri: str) -> list[str]:
    """The spellings of ``uri``'s secrets a message may quote: each part :func:`redact_uri`
    hides, raw, percent-decoded and with runs of whitespace as one space; longest first.
    Spellings shorter than 3 characters are left out."""
    parts: list[str] = []
    for start, end in _secret_spans(uri):
        value = uri[start:end]
        # SQLAlchemy and libpq end a password at the first '@'; a message may quote that.
        parts += [value, value.split("@", 1)[0]]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            parts.append(re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL))
    found: set[str] = set()
    for part in parts:
        for spelling in (part, unquote(part), unquote_plus(part)):
            found.update((spelling, " ".join(spelling.split())))
    # Masking every "a" or space of a line would garble it; a message that quotes the URI is
    # still redacted by the regexes, and a driver does not echo passwords on their own.
    return sorted((s for s in found if len(s.strip()) >= 3), key=lambda s: (-len(s), s))
