"""Is the destination the one the sync state describes, and does this state folder own the spool?

A sync state says what one destination acknowledged. Two things can make it lie:

* the destination was lost or replaced (its SQLite file deleted, an older backup restored):
  the state believes the destination holds runs it no longer has;
* a second state folder (another ``sync.state_dir``) syncs the same spool into the same
  destination: neither knows what the other created, and duplicate runs follow.

So each state folder has an id (a random uuid, table ``meta`` of its ``state.sqlite3``) and
a **generation**, and the destination records both, as tags of its identity experiment —
the ``Default`` experiment (id ``0``), or, where that one is deleted or cannot be tagged,
an experiment named :data:`FALLBACK_EXPERIMENT`:

``ff.sync.state.<state id>``  ``{"generation": N, "owner": "host:/path/of/the/state/folder"}``
``ff.sync.spool.<spool key>``  the id of the state folder that owns this spool here

Every pass that opens the destination compares (:func:`decide`), then raises the generation,
destination first, then state, at its start and again at its end; a restored backup therefore
shows an older generation than the state. The idle pass of a SQLite destination checks the
same with the standard library (:func:`sqlite_problem`), without importing MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import orjson

from formula_foundry.sync.engine.sync_state import STATE_FILE

TAG_PREFIX: Final = "ff.sync."
STATE_TAG: Final = "ff.sync.state."
SPOOL_TAG: Final = "ff.sync.spool."
IDENTITY_EXPERIMENT_ID: Final = "0"
FALLBACK_EXPERIMENT: Final = "ff-sync-identity"


@runtime_checkable
class IdentitySink(Protocol):
    """A sink that can keep the tags of this module (``MlflowSink`` and its wrappers)."""

    def identity_tags(self) -> dict[str, str]:
        """The ``ff.sync.*`` tags of the destination's identity experiment."""
        ...

    def set_identity_tag(self, key: str, value: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Mark:
    """What the destination records about one state folder."""

    generation: int
    owner: str


@dataclass(frozen=True, slots=True)
class DestinationMarks:
    """The parsed identity tags of a destination."""

    states: dict[str, Mark] = field(default_factory=dict)
    spools: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, tags: Mapping[str, str]) -> DestinationMarks:
        states: dict[str, Mark] = {}
        spools: dict[str, str] = {}
        for key, value in tags.items():
            if key.startswith(STATE_TAG):
                try:
                    doc = orjson.loads(value)
                    states[key[len(STATE_TAG) :]] = Mark(
                        int(doc["generation"]), str(doc.get("owner", "?"))
                    )
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # not ours to read: as if absent
            elif key.startswith(SPOOL_TAG):
                spools[key[len(SPOOL_TAG) :]] = value
        return cls(states, spools)


def spool_key(spool_root: Path) -> str:
    """The spool's name in tags: 16 hex of the sha256 of its absolute path."""
    return hashlib.sha256(str(spool_root.absolute()).encode()).hexdigest()[:16]


def owner_label(state_folder: Path) -> str:
    """``host:/absolute/path`` of a state folder, for humans and to recognise a recreated one."""
    return f"{socket.gethostname()}:{state_folder.absolute()}"


def state_tag(state_id: str, generation: int, owner: str) -> tuple[str, str]:
    doc = orjson.dumps({"generation": generation, "owner": owner}).decode()
    return f"{STATE_TAG}{state_id}", doc


def new_state_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a pass does about its destination: refuse (``refusal``), forget its progress
    (``reset``), and with which state id it goes on; ``warning``: one line to show."""

    state_id: str
    reset: bool = False
    warning: str | None = None
    refusal: str | None = None


def decide(
    marks: DestinationMarks,
    *,
    state_id: str | None,
    generation: int,
    has_progress: bool,
    created: bool,
    spool: Path,
    owner: str,
    replay: bool,
    description: str,
) -> Verdict:
    """Compare the destination's marks with the state (see the module docstring)."""
    key = spool_key(spool)
    holder = marks.spools.get(key)
    if replay:
        sid = state_id or new_state_id()
        other = marks.states.get(holder or "")
        taken = holder is not None and holder != sid and (other is None or other.owner != owner)
        note = (
            f"{description}: taking over the spool {spool} from the sync state folder "
            f"{other.owner if other else holder} (--replay)"
            if taken
            else None
        )
        return Verdict(sid, reset=True, warning=note)
    if holder is not None and holder != state_id:
        other = marks.states.get(holder)
        if other is not None and other.owner == owner:
            # This very folder, deleted and created again: it resends everything, as before.
            return Verdict(holder, reset=True)
        where = other.owner if other is not None else f"state id {holder}"
        return Verdict(
            state_id or "",
            refusal=(
                f"{description} already receives the spool {spool} from another sync state "
                f"folder ({where}); two state folders would create duplicate runs. Use that "
                "folder's sync.state_dir, or, if it is gone for good, run ff-sync --replay "
                "to take over (everything is sent again, nothing duplicated)"
            ),
        )
    if state_id is None:
        if created and has_progress:  # a state from before identities, its store gone
            return Verdict(new_state_id(), reset=True, warning=_lost(description, _NEW))
        return Verdict(new_state_id())
    mark = marks.states.get(state_id)
    if mark is None:
        why = _NEW if created else "does not know this sync state (replaced by another store?)"
        return Verdict(state_id, reset=True, warning=_lost(description, why))
    if mark.generation < generation:
        return Verdict(
            state_id,
            reset=True,
            warning=_lost(
                description,
                f"is older than its sync state (generation {mark.generation} < {generation}: "
                "restored from a backup?)",
            ),
        )
    return Verdict(state_id)


_NEW = "is a new, empty store, but the sync state says runs were synced into it (lost?)"


def _lost(description: str, why: str) -> str:
    return f"destination {description} {why}: sending everything again"


# -- the cheap check of a SQLite destination (idle passes, status, gc) -------------------------


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI; ``None`` for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest.startswith(":memory:") or rest.startswith("file:"):
        return None
    return Path(rest)


def read_sqlite_tags(db: Path) -> dict[str, str] | None:
    """The identity tags of a SQLite store, read with the standard library (no MLflow);
    ``None`` if there is no such file. Raises :class:`sqlite3.Error` if it cannot be read."""
    try:
        if not db.is_file():
            return None
    except OSError as exc:  # a folder this user cannot search: we cannot tell
        raise sqlite3.OperationalError(f"cannot look at {db}: {exc.strerror or exc}") from None
    # as_uri() percent-encodes '?', '#' and '%' in the path, which a raw "file:" URI would cut.
    con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = con.execute(
            "SELECT e.experiment_id, e.name, t.key, t.value FROM experiments e "
            "JOIN experiment_tags t ON t.experiment_id = e.experiment_id "
            "WHERE (e.experiment_id = ? OR e.name = ?) AND e.lifecycle_stage = 'active' "
            "AND t.key LIKE 'ff.sync.%'",
            (int(IDENTITY_EXPERIMENT_ID), FALLBACK_EXPERIMENT),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}  # an empty file, or not (yet) an MLflow store: nothing recorded
        raise
    finally:
        con.close()
    return select_tags([(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows])


def select_tags(rows: list[tuple[str, str, str, str]]) -> dict[str, str]:
    """From ``(experiment id, name, key, value)`` rows of active experiments, the tags of the
    identity experiment: the fallback experiment if it exists, else ``Default``."""
    fallback = {k: v for _, name, k, v in rows if name == FALLBACK_EXPERIMENT}
    if fallback:
        return fallback
    return {k: v for eid, _, k, v in rows if eid == IDENTITY_EXPERIMENT_ID}


def sqlite_problem(
    uri: str, state_id: str | None, generation: int, has_progress: bool, spool: Path
) -> str | None:
    """Why a SQLite destination is not the one the state describes, or ``None`` (also for
    other destinations, and when it cannot tell). Standard library only: a few ms."""
    db = sqlite_path(uri)
    if db is None or (state_id is None and not has_progress):
        return None
    try:
        tags = read_sqlite_tags(db)
    except sqlite3.Error:
        return None  # a pass that opens it will say what is wrong
    if tags is None:
        return f"destination lost: no store at {db}" if has_progress else None
    if state_id is None:
        return None
    marks = DestinationMarks.parse(tags)
    holder = marks.spools.get(spool_key(spool))
    if holder is not None and holder != state_id:
        other = marks.states.get(holder)
        where = other.owner if other is not None else holder
        return f"destination owned by another sync state folder ({where})"
    mark = marks.states.get(state_id)
    if mark is None:
        return f"destination replaced: {db} does not know this sync state"
    if mark.generation < generation:
        return (
            f"destination restored from an older copy: {db} is at generation "
            f"{mark.generation}, the sync state at {generation}"
        )
    return None


def destination_problem(uri: str, state_folder: Path, spool_root: Path) -> str | None:
    """For ``ff-sync status``/``gc``: why the SQLite destination ``uri`` is not the one the
    state in ``state_folder`` describes (lost, replaced, restored from an older backup, owned
    by another state folder), or ``None``. Reads the state read-only; never imports MLflow.
    PostgreSQL and servers: always ``None`` (their check needs a connection; a pass does it).
    """
    if sqlite_path(uri) is None:
        return None
    path = state_folder / STATE_FILE
    try:
        if not path.is_file():
            return None
    except OSError:
        return None  # status says what it cannot read in its own words
    meta: dict[str, str] = {}
    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            progress = con.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is not None
            with contextlib.suppress(sqlite3.OperationalError):  # no table meta: schema 1
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return None  # unreadable or empty: status says so in its own words
    generation = str(meta.get("generation", "0"))
    return sqlite_problem(
        uri,
        meta.get("id"),
        int(generation) if generation.isdigit() else 0,
        progress,
        spool_root,
    )
