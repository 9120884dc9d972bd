"""``spool:`` tracking URIs: which spool root a URI names.

* ``spool:///abs/path`` — that folder;
* ``spool:relative/path`` — relative to the working directory when the store is opened;
* ``spool:`` — the configured ``spool.root`` (``FF_SPOOL_ROOT``, ``formula_foundry.yaml``).

The parsing rules live in :func:`formula_foundry.config.spool_uri_path`, which ``ff-sync`` also
uses to find the spool a ``MLFLOW_TRACKING_URI=spool:...`` in its environment names.
"""

from __future__ import annotations

import os
from pathlib import Path

from formula_foundry.config import SPOOL_SCHEME, load_settings, spool_uri_path


def spool_root(uri: str) -> Path:
    """The absolute spool root named by ``uri``; :class:`ConfigError` if it names none."""
    named = spool_uri_path(uri)
    if not named:
        return load_settings().spool_root.absolute()
    path = Path(os.path.expanduser(named))
    return path if path.is_absolute() else Path.cwd() / path


def canonical_uri(root: Path) -> str:
    """The ``spool:///...`` URI of ``root`` (what the store reports as its tracking URI)."""
    return f"{SPOOL_SCHEME}://{root.absolute().as_posix()}"
