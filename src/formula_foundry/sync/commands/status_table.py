"""The human-readable form of ``ff-sync status``, and where a run is in the MLflow UI.

Without run ids: a block per destination, a line per run (:func:`render_table`). With run ids:
a block per run (:func:`render_runs`) mapping the spool run id to the destination's run id,
its page in the MLflow UI and the search filter that finds it. Imports no MLflow, and
:mod:`formula_foundry.sync.commands.status` only for type checking (it imports the helpers below).
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, urlsplit

from formula_foundry.redact import redact_uri

if TYPE_CHECKING:
    from formula_foundry.sync.commands.status import RunStatus, StatusReport

LOCAL_UI: Final = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default
_DB_SCHEMES: Final = ("sqlite", "postgresql", "postgres", "mysql", "mssql")


def search_filter(spool_run_id: str) -> str:
    """The MLflow search filter (UI search box, ``search_runs``) that finds the run of a spool
    run id: the sync tags every run it creates with ``ff.run_uuid``."""
    quoted = spool_run_id.replace("\\", "\\\\").replace("'", "\\'")
    return f"tags.`ff.run_uuid` = '{quoted}'"


def ui_of(uri: str) -> tuple[str | None, str | None]:
    """Where the MLflow UI of destination ``uri`` is, and the command serving it: a server's
    own address; for a database, ``mlflow ui`` on it (default address). ``(None, None)``: not
    known. Passwords never appear: both come from the redacted URI, the address without its
    user part and query."""
    safe = redact_uri(uri)
    scheme = safe.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        parts = urlsplit(safe)
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{scheme}://{host}{parts.path.rstrip('/')}", None
    if scheme.split("+", 1)[0] in _DB_SCHEMES:
        return LOCAL_UI, f"mlflow ui --backend-store-uri {shlex.quote(safe)}"
    return None, None


def run_url(base: str | None, experiment_id: str | None, mlflow_run_id: str | None) -> str | None:
    """The page of a run in the MLflow UI at ``base``."""
    if base is None or not experiment_id or not mlflow_run_id:
        return None
    return (
        f"{base}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(mlflow_run_id, safe='')}"
    )


def _when(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    age = max(0, (now_ms - ms) // 1000)
    if age < 120:
        ago = f"{age}s"
    elif age < 7200:
        ago = f"{age // 60}m"
    elif age < 172800:
        ago = f"{age // 3600}h"
    else:
        ago = f"{age // 86400}d"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))} ({ago} ago)"


def render_table(report: StatusReport) -> str:
    """The human-readable form: one block per destination, one line per run, a total."""
    now = report.generated_ms
    lines = _head(report)
    for dest in report.destinations:
        t = dest.totals()
        lines += [
            "",
            f"destination: {dest.destination}{'' if dest.configured else ' (not configured)'}",
            f"state:       {dest.state_folder}",
            f"last sync:   {_when(dest.last_sync_ms, now)}",
        ]
        if dest.problem:
            lines.append(
                f"problem:     {dest.problem}; the counts below are what the state recorded, "
                "the next ff-sync pass sends everything again"
            )
        lines.append("")
        rows = [("RUN", "STATUS", "SYNCED", "PENDING", "QUARANTINED", "LAST SYNC", "NOTE")]
        for r in dest.runs:
            note = "ended by sync (silent)" if r.ended_by_sync else "dead?" if r.dead else ""
            if r.problems:
                note = f"{note}, not all synced (below)" if note else "not all synced (below)"
            if r.bytes_pending_upload:
                upload = f"{_size(r.bytes_pending_upload)} of files to upload"
                note = f"{note}, {upload}" if note else upload
            rows.append(
                (
                    r.run,
                    r.status or "not synced",
                    str(r.events_synced),
                    str(r.events_pending),
                    str(r.events_quarantined),
                    _when(r.last_sync_ms, now),
                    note,
                )
            )
        rows.append(
            (
                f"TOTAL ({t['runs']} runs)",
                "",
                str(t["events_synced"]),
                str(t["events_pending"]),
                str(t["events_quarantined"]),
                "",
                f"{t['runs_dead']} dead?" if t["runs_dead"] else "",
            )
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {2, 3, 4}
        for row in rows:
            cells = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        problems = [f"  run {r.run}: {p}" for r in dest.runs for p in r.problems]
        if problems:
            lines += ["", "not synced:", *problems]
    return "\n".join(lines)


def _head(report: StatusReport) -> list[str]:
    return [f"spool root: {report.spool_root}", *(f"not synced: {p}" for p in report.problems)]


def render_runs(report: StatusReport) -> str:
    """The form of ``ff-sync status RUN_ID...``: per destination, a block per run."""
    lines = _head(report)
    for dest in report.destinations:
        lines += [
            "",
            f"destination: {dest.destination}{'' if dest.configured else ' (not configured)'}",
            f"state:       {dest.state_folder}",
        ]
        if dest.ui_command:
            lines.append(f"mlflow ui:   {dest.ui_command}  (serves the addresses below)")
        lines.append(
            "search:      a run's filter below, in the MLflow UI search box of its experiment"
        )
        if dest.problem:
            lines.append(
                f"problem:     {dest.problem}; the ids below are what the state recorded, "
                "the next ff-sync pass sends everything again"
            )
        for run in dest.runs:
            lines += ["", *_run_block(run, report.generated_ms)]
    return "\n".join(lines)


def _run_block(r: RunStatus, now_ms: int) -> list[str]:
    counts = (
        f"{r.events_synced} events synced, {r.events_pending} pending, "
        f"{r.events_quarantined} quarantined"
    )
    if r.status is not None and not (r.events_synced or r.events_pending or r.problems):
        counts = "no longer in the spool (collected by ff-sync gc?)"
    if r.bytes_pending_upload:
        counts += f"; {_size(r.bytes_pending_upload)} of logged files to upload"
    out = [f"run {r.run}"]
    if r.status is None:
        out.append(f"  status:        not synced yet; {r.events_pending} events pending")
    else:
        out += [
            f"  status:        {r.status}; {counts}",
            f"  last sync:     {_when(r.last_sync_ms, now_ms)}",
            f"  mlflow run id: {r.mlflow_run_id}",
            f"  experiment id: {r.experiment_id}",
            f"  address:       {r.ui_url or 'unknown for this destination (search below)'}",
        ]
    later = "  (finds it once synced)" if r.status is None else ""
    out.append(f"  search filter: {search_filter(r.run)}{later}")
    if r.ended_by_sync or r.dead:
        out.append(f"  note:          {'ended by sync (silent)' if r.ended_by_sync else 'dead?'}")
    out += [f"  not synced:    {p}" for p in r.problems]
    return out


def _size(n: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB")
    value, power = float(n), 0
    while value >= 1024 and power < len(units) - 1:
        value, power = value / 1024, power + 1
    return f"{n} bytes" if power == 0 else f"{value:.1f} {units[power]}"
