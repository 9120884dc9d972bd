"""Experiment ids on a node: the same name gives the same id in every process, on every node.

There is no database to hand out ids, so an experiment's id is derived from its name (a
SHA-256 prefix, as a decimal string like MLflow's own ids); ``Default`` keeps MLflow's id
``"0"``. Processes that share the spool agree on ids without talking to each other.

Each experiment created on the spool is also recorded as ``<spool>/.experiments/<id>.json``
(``{"name": ..., "created": ms}``), written once and never changed, so a later process can turn
an id back into its name. The sync ignores folders whose names start with a dot; experiments
reach MLflow by name, with the runs that use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from formula_foundry.errors import ValidationError
from formula_foundry.tracking.events import MAX_EXPERIMENT_NAME_LENGTH, check_name
from formula_foundry.tracking.spool_writer import now_ms

DEFAULT_ID: Final = "0"
DEFAULT_NAME: Final = "Default"
RECORDS: Final = ".experiments"


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    created: int


def experiment_id(name: str) -> str:
    """The id every process gives the experiment ``name``."""
    if name == DEFAULT_NAME:
        return DEFAULT_ID
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    # 60 bits: a collision needs about a billion names; "0" is never produced (MLflow's Default).
    return str((int.from_bytes(digest[:8], "big") >> 4) | 1)


class ExperimentBook:
    """The experiments of one spool root: recorded names, cached per process."""

    def __init__(self, root: Path) -> None:
        self.folder = root / RECORDS
        self._known: dict[str, Experiment] = {}
        self._lock = threading.Lock()

    def create(self, name: str) -> tuple[Experiment, bool]:
        """Record ``name``; return it and whether this call created it (False: it existed)."""
        name = check_name("experiment name", name, MAX_EXPERIMENT_NAME_LENGTH)
        exp_id = experiment_id(name)
        found = self.by_id(exp_id)
        if found is not None:
            self._check_same(found, name)
            return found, False
        exp = Experiment(exp_id, name, now_ms())
        if exp_id != DEFAULT_ID:
            created = self._write(exp)
            if not created:
                found = self._read(exp_id)
                if found is not None:
                    self._check_same(found, name)
                    return found, False
        with self._lock:
            self._known[exp_id] = exp
        return exp, True

    def by_id(self, exp_id: str) -> Experiment | None:
        exp = self._known.get(exp_id)
        if exp is not None:
            return exp
        if exp_id == DEFAULT_ID:
            exp = self._read(exp_id) or Experiment(DEFAULT_ID, DEFAULT_NAME, 0)
        else:
            exp = self._read(exp_id)
        if exp is not None:
            with self._lock:
                self._known[exp_id] = exp
        return exp

    def by_name(self, name: str) -> Experiment | None:
        if not isinstance(name, str):
            return None
        exp = self.by_id(experiment_id(name))
        return exp if exp is not None and exp.name == name else None

    def ensure(self, name: str) -> Experiment:
        """The experiment ``name``, recorded if it was not (a run names it)."""
        exp = self.by_name(name)
        return exp if exp is not None else self.create(name)[0]

    def all(self) -> list[Experiment]:
        """Every recorded experiment, and Default."""
        found = {DEFAULT_ID: self.by_id(DEFAULT_ID)}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.folder):
                exp_id = entry.name.removesuffix(".json")
                if entry.name.endswith(".json") and exp_id.isdigit():
                    found[exp_id] = self.by_id(exp_id)
        return [e for e in found.values() if e is not None]

    # -- records ----------------------------------------------------------------------------

    def _check_same(self, found: Experiment, name: str) -> None:
        if found.name != name:  # pragma: no cover - needs a 60-bit hash collision
            raise ValidationError(
                f"experiment {name!r} would get id {found.experiment_id}, already taken by "
                f"{found.name!r} in {self.folder}; choose another name"
            )

    def _write(self, exp: Experiment) -> bool:
        """Write the record once (link of a complete temporary file); False if it existed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{exp.experiment_id}.json"
        tmp = self.folder / f".{exp.experiment_id}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        tmp.write_bytes(orjson.dumps({"name": exp.name, "created": exp.created}))
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return True

    def _read(self, exp_id: str) -> Experiment | None:
        try:
            doc = orjson.loads((self.folder / f"{exp_id}.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        name, created = doc.get("name") if isinstance(doc, dict) else None, None
        if isinstance(doc, dict):
            created = doc.get("created")
        if not isinstance(name, str) or not name:
            return None
        return Experiment(exp_id, name, created if isinstance(created, int) else 0)
