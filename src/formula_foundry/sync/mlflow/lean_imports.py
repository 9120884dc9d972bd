"""Keep MLflow's data-science dependencies out of the ``ff-sync`` process.

``import mlflow`` eagerly imports pandas, SciPy and PyArrow (for datasets, evaluation and
model signatures): about 75 MiB of resident memory and a second of CPU in every pass, for
code the sync never runs. MLflow itself supports running without them (``mlflow-skinny``
does not install them) and guards every such import, so the ``ff-sync`` command hides them:
to MLflow they look not installed. Tracking servers, SQL stores and artifact references
work the same way; a sync host's peak memory drops from ~250 to ~175 MiB.

Only the command's own process is affected (:func:`formula_foundry.sync.commands.cli.run`); code
that calls the sync as a library keeps its imports. ``FF_SYNC_IMPORT_ALL=1`` turns this off, for
an MLflow plugin that needs one of these packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Final

HIDDEN: Final = frozenset({"pandas", "scipy", "pyarrow"})
OPT_OUT_ENV: Final = "FF_SYNC_IMPORT_ALL"


class _HideModules(importlib.abc.MetaPathFinder):
    """A finder that answers "not installed" for a few top-level packages."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (ff-sync hides it from MLflow to save memory; "
                f"{OPT_OUT_ENV}=1 loads it)",
                name=fullname,
            )
        return None


def hide_unused_modules() -> bool:
    """Hide :data:`HIDDEN` from later imports in this process; whether they are now hidden.

    Nothing is hidden when the user opted out, or when one of them is already imported
    (hiding the rest would leave that one half-usable).
    """
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    if any(name in sys.modules for name in HIDDEN):
        return False
    if not any(isinstance(f, _HideModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideModules(HIDDEN))
    return True


def hidden_module(exc: ImportError) -> str | None:
    """The hidden package ``exc`` failed to import, if that is why it was raised."""
    top = (exc.name or "").partition(".")[0]
    if top in HIDDEN and any(isinstance(f, _HideModules) for f in sys.meta_path):
        return top
    return None
