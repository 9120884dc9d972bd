"""What one sync pass did: counts, quarantined records, runs that wait or were refused."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from formula_foundry.errors import EXIT_OK, EXIT_PARTIAL
from formula_foundry.redact import MASK, redact_text, redact_uri, uri_secrets

# How many quarantine lines a report keeps for display (all are in quarantine.jsonl).
SHOWN_PROBLEMS = 20


@dataclass(frozen=True, slots=True)
class Progress:
    """Handed to the progress callback after each batch the destination committed."""

    runs_done: int
    runs_total: int
    events: int
    metrics: int
    spool_run_id: str


ProgressFn = Callable[[Progress], None]
# Where a URI starts inside free text (a driver's or MLflow's message): ``scheme://``, or
# for the database and server schemes also ``scheme:`` with one slash or none when a
# ``user:`` follows (``postgresql:/u:pw@h``), which a driver may still read.
_LOOSE_SCHEMES = r"postgres(?:ql)?|mysql|mariadb|mssql|oracle|sqlite|https?|databricks"
_URI_HEAD = re.compile(
    r"(?<![\w+.\-/\\])(?:[A-Za-z][A-Za-z0-9+.\-]*+://(?P<user>/?+[^\s:/'\"@]*+:)?"
    rf"|(?P<loose>(?i:{_LOOSE_SCHEMES})(?:\+[\w.\-]++)?:/?+[^\s:/'\"@]*+:))"
)
_TOKEN = re.compile(r"[^\s'\"]*+")
_HOST = re.compile(r"[^\s'\"@]*+")


def _redact_uris(line: str) -> str:
    """Each URI in ``line`` through :func:`redact_uri`. One with ``user:`` runs to the last
    '@' of the line and the host after it (its password may hold spaces, quotes, '/', '@');
    any other ends at the next space or quote. Linear: each character is looked at once."""
    last_at = line.rfind("@")
    parts: list[str] = []
    pos = 0
    while (m := _URI_HEAD.search(line, pos)) is not None:
        parts.append(line[pos : m.start()])
        if last_at >= m.end() and (m.group("loose") or m.group("user")):
            end = _HOST.match(line, last_at + 1).end()  # type: ignore[union-attr]
        elif m.group("loose"):
            end = m.end()  # ``postgresql:x:`` without an '@' after it: not a URI
        else:
            end = _TOKEN.match(line, m.end()).end()  # type: ignore[union-attr]
        parts.append(redact_uri(line[m.start() : end]))
        pos = end
    parts.append(line[pos:])
    return "".join(parts)


def one_line(text: str, uri: str | None = None, limit: int = 400) -> str:
    """``text`` on one line, shortened, with every password hidden: each spelling of
    ``uri``'s secrets, then the userinfo and secret parameters of any URI in it."""
    line = " ".join(text.split())
    if uri:
        for secret in uri_secrets(uri):
            line = line.replace(secret, MASK)
    line = redact_text(_redact_uris(line))
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class SyncReport:
    """The outcome of one pass into one destination.

    ``runs``: runs with pending segments that were replayed; ``events``: spool events
    committed in the destination this pass (0 for an idle pass); ``quarantined``: records
    set aside this pass (param conflicts included, see ``conflicts``); ``blocked``: runs the
    destination refused (they stay where they were and are retried by the next pass);
    ``waiting``: runs that cannot start yet (no run_start event, or parent not found).
    """

    destination: str
    state_folder: Path
    runs: int = 0
    events: int = 0
    metrics: int = 0
    files: int = 0  # logged files uploaded (``artifact`` events)
    file_bytes: int = 0
    segments: int = 0
    quarantined: int = 0
    conflicts: int = 0
    idle: bool = False
    mlflow_imported: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # runs this pass ended as KILLED (dead)
    # Spool paths this pass could not read (permission denied, a symbolic link): not synced,
    # named on every pass until fixed, and the pass exits 1 so cron notices.
    unreadable: list[str] = field(default_factory=list)
    # Runs replayed concurrently (formula_foundry.sync.engine.parallel): 1 for SQLite and any
    # destination that does not gain from it, ``sync.workers`` for servers.
    workers: int = 1

    @property
    def quarantine_file(self) -> Path:
        return self.state_folder / "quarantine.jsonl"

    @property
    def exit_code(self) -> int:
        """0: everything synced; 1: synced, but records were quarantined or runs refused."""
        return EXIT_PARTIAL if (self.quarantined or self.blocked or self.unreadable) else EXIT_OK

    def add_problem(self, text: str) -> None:
        self.quarantined += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(text)

    def merge(self, other: SyncReport) -> None:
        """Add what a worker's own report counted (a parallel pass gives each one its own)."""
        self.runs += other.runs
        self.events += other.events
        self.metrics += other.metrics
        self.files += other.files
        self.file_bytes += other.file_bytes
        self.segments += other.segments
        self.quarantined += other.quarantined
        self.conflicts += other.conflicts
        self.problems += other.problems[: max(0, SHOWN_PROBLEMS - len(self.problems))]
        self.blocked += other.blocked
        self.waiting += other.waiting
        self.warnings += other.warnings
        self.stale += other.stale
        self.unreadable += other.unreadable

    def summary(self) -> str:
        """One line: runs, events, quarantined, seconds, destination."""
        parts = [
            f"{self.runs} run{'s' if self.runs != 1 else ''}",
            f"{self.events} event{'s' if self.events != 1 else ''}",
            f"{self.quarantined} quarantined",
        ]
        if self.files:
            parts.insert(2, f"{self.files} file{'s' if self.files != 1 else ''} uploaded")
        if self.blocked:
            parts.append(f"{len(self.blocked)} refused")
        if self.waiting:
            parts.append(f"{len(self.waiting)} waiting")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        if self.stale:
            parts.append(f"{len(self.stale)} dead run{'s' if len(self.stale) != 1 else ''} ended")
        head = "nothing new" if self.idle else "synced"
        return f"ff-sync: {head}: {', '.join(parts)} in {self.seconds:.2f} s -> {self.destination}"

    def details(self) -> list[str]:
        """Lines worth showing before the summary (problems, refusals, waits, warnings)."""
        lines = [f"quarantined: {p}" for p in self.problems]
        if self.quarantined > len(self.problems):
            lines.append(f"... {self.quarantined - len(self.problems)} more")
        if self.quarantined:
            lines.append(f"quarantine report: {self.quarantine_file}")
        lines += [f"refused: {b}" for b in self.blocked]
        lines += [f"waiting: {w}" for w in self.waiting]
        lines += [f"unreadable: {u}" for u in self.unreadable]
        lines += [f"warning: {w}" for w in self.warnings]
        return lines
