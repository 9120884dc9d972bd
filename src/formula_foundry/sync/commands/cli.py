"""``ff-sync``: the command line of the sync. It parses, calls the library, prints, exits.

Exit codes (documented in docs/sync.md) come from the exception classes
(:attr:`FormulaFoundryError.exit_code`), mapped in one place: :func:`_run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from formula_foundry.config import Settings
from formula_foundry.errors import EXIT_OK, EXIT_USAGE, ConfigError, FormulaFoundryError
from formula_foundry.sync.engine.report import Progress, one_line
from formula_foundry.sync.engine.sync_pass import load_sync_settings, sync_once

if TYPE_CHECKING:
    from formula_foundry.sync.commands.differences import Difference

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # EX_SOFTWARE


@dataclass(frozen=True)
class SyncOptions:
    """The options every ff-sync command shares."""

    config: Path | None
    tracking_uri: str | None
    spool_root: Path | None
    stale_after: float | None = None

    def settings(self) -> Settings:
        settings = load_sync_settings(
            self.config, tracking_uri=self.tracking_uri, spool_root=self.spool_root
        )
        if self.stale_after is not None:
            settings = dataclasses.replace(settings, stale_after_s=self.stale_after)
        return settings


def _run(fn: Callable[[], int]) -> int:
    """Run a command body; turn our errors into one line on stderr and their exit code."""
    try:
        return fn()
    except FormulaFoundryError as exc:
        message = one_line(str(exc) or type(exc).__name__, limit=1000)
        click.echo(f"ff-sync: error: {message}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("ff-sync: interrupted; what was committed is recorded", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so on one line, never pass for "partial" (1)
        if os.environ.get("FF_DEBUG"):
            traceback.print_exc()
        message = one_line(f"{type(exc).__name__}: {exc}", limit=600)
        click.echo(
            f"ff-sync: internal error: {message} (set FF_DEBUG=1 for the traceback; "
            "please report it)",
            err=True,
        )
        return EXIT_INTERNAL


class _ProgressLine:
    """One self-overwriting line on a terminal, at most five updates a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._shown = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self._shown = True
        click.echo(
            f"\rff-sync: run {min(p.runs_done + 1, p.runs_total)}/{p.runs_total}, "
            f"{p.events} events, {p.metrics} metrics",
            err=True,
            nl=False,
        )

    def clear(self) -> None:
        if self._shown:
            click.echo("\r\x1b[K", err=True, nl=False)


def _sync(opts: SyncOptions, replay: bool, quiet: bool) -> int:
    settings = opts.settings()
    line = _ProgressLine() if not quiet and sys.stderr.isatty() else None
    try:
        report = sync_once(settings, replay=replay, progress=line)
    finally:
        if line is not None:
            line.clear()
    if not quiet:
        for detail in report.details():
            # Long enough for a refusal's reason after the names it quotes (shortened there).
            text = one_line(detail, settings.backend_store_uri, limit=1000)
            click.echo(f"ff-sync: {text}", err=True)
    click.echo(one_line(report.summary(), settings.backend_store_uri, limit=1000))
    return report.exit_code


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Config file (default: $FF_CONFIG, else config/mlflow.yaml found from the working "
    "directory up).",
)
@click.option(
    "--tracking-uri",
    metavar="URI",
    help="Destination: sqlite:///path.db, postgresql://..., http(s)://host:port "
    "(overrides tracking.backend_store_uri and MLFLOW_TRACKING_URI).",
)
@click.option(
    "--spool-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Spool root to read (overrides spool.root and FF_SPOOL_ROOT). Read access is enough.",
)
@click.option(
    "--replay",
    is_flag=True,
    help="Forget what this destination acknowledged and send everything again (e.g. after "
    "restoring its database from a backup); converges to the same state. Also takes over the "
    "spool from another sync state folder that owns it in this destination.",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0.0, min_open=True),
    metavar="SECONDS",
    help="A run silent this long without an end event is marked KILLED, at its last sign of "
    "life (overrides sync.stale_after_s).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress and no detail lines.")
@click.pass_context
def main(
    ctx: click.Context,
    config: Path | None,
    tracking_uri: str | None,
    spool_root: Path | None,
    replay: bool,
    stale_after: float | None,
    quiet: bool,
) -> None:
    """Replay spooled runs into the MLflow tracking store, exactly once.

    Without a command: one pass over everything pending under the spool root, ending with a
    one-line summary.

    \b
    Exit codes:
      0   everything pending was synced
      1   synced, but some records were quarantined or refused (see the quarantine report)
      2   usage or configuration error (also: MLflow not installed, another sync state
          folder owns this spool in the destination)
      75  destination unavailable, or another ff-sync holds its lock: try again later
      70  internal error (a bug; FF_DEBUG=1 shows the traceback)
    """
    ctx.obj = SyncOptions(config, tracking_uri, spool_root, stale_after)
    if ctx.invoked_subcommand is not None:
        return
    code = _run(lambda: _sync(ctx.obj, replay, quiet))
    ctx.exit(code if code != EXIT_OK else EXIT_OK)


def _err(line: str) -> None:
    click.echo(line, err=True)


@main.command("watch")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds from the start of one pass to the start of the next.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop after N passes (default: run until SIGTERM/SIGINT).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line of passes that did work.")
@click.pass_obj
def watch_command(opts: SyncOptions, interval: float, max_passes: int | None, quiet: bool) -> None:
    """Sync every INTERVAL seconds until SIGTERM/SIGINT (which finish the pass, exit 0).

    An unavailable destination or a lock held by another ff-sync is logged on one line and
    retried at the next interval.
    """
    from formula_foundry.sync.commands.watch import watch

    code = _run(
        lambda: watch(opts.settings(), interval, log=_err, max_passes=max_passes, quiet=quiet)
    )
    sys.exit(code)


@main.command("gc")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0.0),
    required=True,
    metavar="SECONDS",
    help="Only runs whose segments were all last modified at least this long ago.",
)
@click.option(
    "--archive",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Move collected run folders here (default: <spool root>/../runs-archive).",
)
@click.option("--delete", is_flag=True, help="Delete collected run folders instead of moving.")
@click.option("--dry-run", is_flag=True, help="Only print what would be archived or deleted.")
@click.pass_obj
def gc_command(
    opts: SyncOptions, older_than: float, archive: Path | None, delete: bool, dry_run: bool
) -> None:
    """Archive or delete the spool folders of ended runs every destination fully has.

    A run folder is collected only if, in every destination with a state folder under
    sync.state_dir, the run's end event is synced and each of its segments is acknowledged
    to its last byte; never anything still to sync.
    """

    def body() -> int:
        if archive is not None and delete:
            raise ConfigError("--archive and --delete exclude each other")
        from formula_foundry.sync.commands.gc import collect_garbage

        settings = opts.settings()
        report = collect_garbage(
            settings, older_than, archive=archive, delete=delete, dry_run=dry_run, log=_err
        )
        click.echo(report.summary("delete" if delete else "archive", dry_run))
        return EXIT_OK

    sys.exit(_run(body))


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@main.command("status")
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys in docs/operations.md).")
@click.option(
    "--all",
    "all_destinations",
    is_flag=True,
    help="Every destination with a state folder under sync.state_dir, not only the configured one.",
)
@click.pass_obj
def status_command(
    opts: SyncOptions, run_ids: tuple[str, ...], as_json: bool, all_destinations: bool
) -> None:
    """Events pending, synced and quarantined per run and in total; runs that look dead.

    With RUN_IDs (the run ids printed where the runs were logged, `ff.run_uuid` in MLflow):
    only those runs, each with the destination's run id and experiment id, the run's address
    in the MLflow UI (for a database: under `mlflow ui`, whose command is shown) and the
    filter that finds it in the UI's search box; or "not synced yet" and its pending events.

    Reads the spools and the sync state, never MLflow; of a SQLite destination only its
    identity tags (with sqlite3, read-only), to warn when the file is not the one synced.

    \b
    Exit codes:
      0   done
      2   usage or configuration error, or a RUN_ID neither in the spool nor in the sync
          state (the runs found are still shown)
    """

    def body() -> int:
        from formula_foundry.sync.commands.status import sync_status
        from formula_foundry.sync.commands.status_table import render_runs, render_table

        wanted = [r.strip() for r in run_ids] if run_ids else None
        if wanted is not None and not all(wanted):
            raise ConfigError("a RUN_ID is empty")
        report = sync_status(opts.settings(), all_destinations=all_destinations, runs=wanted)
        if as_json:
            _print_json(report.to_json())
        elif wanted is None:
            click.echo(render_table(report))
        elif len(report.unknown_runs) < len(set(wanted)):
            click.echo(render_runs(report))
        for run in report.unknown_runs:
            where = "any sync state" if all_destinations else "the sync state of this destination"
            _err(
                f"ff-sync: error: run {one_line(run, limit=200)} is neither in the spool "
                f"{report.spool_root} nor in {where}"
            )
        return EXIT_USAGE if report.unknown_runs else EXIT_OK

    sys.exit(_run(body))


@main.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys in docs/operations.md).")
@click.pass_obj
def verify_command(opts: SyncOptions, as_json: bool) -> None:
    """Compare the destination with the spools and list every difference.

    \b
    Exit codes:
      0   the destination holds exactly what the spools say
      1   differences (listed on stdout)
      2   usage or configuration error (also: MLflow not installed, no SQLite file there)
      75  destination unavailable: try again later
    """

    def body() -> int:
        from formula_foundry.sync.commands.verify import verify

        settings = opts.settings()

        def show(diff: Difference) -> None:
            click.echo(one_line(diff.message, settings.backend_store_uri, limit=2000))

        report = verify(settings, on_difference=None if as_json else show)
        if as_json:
            _print_json(report.to_json())
        else:
            click.echo(report.summary())
        return report.exit_code

    sys.exit(_run(body))


@main.command("tail")
@click.argument("run_id", metavar="RUN_ID")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Print new output as it is spooled, until the run ends (or Ctrl-C).",
)
@click.option(
    "--stream",
    type=click.Choice(["stdout", "stderr"]),
    help="Only this stream (where both went to one place, they were captured as one: shown whole).",
)
@click.pass_obj
def tail_command(opts: SyncOptions, run_id: str, follow: bool, stream: str | None) -> None:
    """Print the console output a run captured (start_run(capture_output=True)).

    Reads the run's spool, never MLflow: any host that sees the spool can follow a job
    while it runs. The output of several processes of the run is merged in time order, each
    process's bytes after a line `==> <host> pid <pid> <==`. Remarks (the capture's size cap
    reached, bytes dropped) go to stderr.

    \b
    Exit codes:
      0   done (with --follow: the run ended, or Ctrl-C)
      2   usage or configuration error, or no such run in the spool
    """
    from formula_foundry.sync.commands.tail import tail_to

    def note(line: str) -> None:
        _err(f"ff-sync tail: {one_line(line, limit=1000)}")

    def body() -> int:
        spool_root = opts.settings().spool_root
        tail_to(sys.stdout.buffer, note, spool_root, run_id, stream=stream, follow=follow)
        return EXIT_OK

    sys.exit(_run(body))


def run() -> None:
    """The ``ff-sync`` command: :func:`main` in a process that skips MLflow's unused imports."""
    from formula_foundry.sync.mlflow.lean_imports import hide_unused_modules

    hide_unused_modules()
    main(prog_name="ff-sync")
