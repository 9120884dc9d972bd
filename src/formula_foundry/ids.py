"""The run-id rule, shared by every part that names or reads a run.

A spool run id is a folder name under the spool root (the tracker's ``run_id=`` and
``FF_RUN_ID``, the MLflow drop-in's runs), the name of a run directory
(:func:`formula_foundry.substrate.init_run_dir`), and what the sync accepts as a run folder or
as a ``run_start``'s ``parent``. One rule for all of them, so a run one part accepts is never
refused (or read as damage) by another: 1-128 ASCII letters, digits, ``.``, ``_`` and ``-``,
starting with a letter or digit. Such a name is always one path component below its root
(``..`` inside it, as in ``sweep..2``, is an ordinary name: the tracker and the sync have
always taken it, and spools may hold such runs).
"""

from __future__ import annotations

import re
from typing import Final

RUN_ID_MAX_LENGTH: Final = 128
_RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_RULE: Final = "use 1-128 letters, digits, '.', '_' and '-', starting with a letter or digit"


def is_run_id(value: object) -> bool:
    """True if ``value`` is a valid run id."""
    return isinstance(value, str) and bool(_RUN_ID.fullmatch(value))


def run_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid run id (a sentence naming it), or None if it is one."""
    if is_run_id(value):
        return None
    if not isinstance(value, str):
        return f"run id {value!r} is not valid: expected a str"
    return f"run id {value!r} is not valid: {RUN_ID_RULE}"
