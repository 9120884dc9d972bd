"""The human-readable form of ``ff-sync status``: a block per destination, a line per run."""

from __future__ import annotations

import time

from formula_foundry.sync.status import StatusReport


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
    lines: list[str] = [f"spool root: {report.spool_root}"]
    lines += [f"not synced: {p}" for p in report.problems]
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
