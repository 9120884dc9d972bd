"""``ff-sync``: the command line of the sync. It parses, calls the library, prints, exits.

Exit codes (documented in docs/sync.md) come from the exception classes
(:attr:`FormulaFoundryError.exit_code`), mapped in one place: :func:`_run`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from formula_foundry.errors import EXIT_OK, FormulaFoundryError
from formula_foundry.sync.engine import load_sync_settings, sync_once
from formula_foundry.sync.report import Progress, one_line

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # EX_SOFTWARE


@dataclass(frozen=True)
class SyncOptions:
    """The options every ff-sync command shares."""

    config: Path | None
    tracking_uri: str | None
    spool_root: Path | None


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
    settings = load_sync_settings(
        opts.config, tracking_uri=opts.tracking_uri, spool_root=opts.spool_root
    )
    line = _ProgressLine() if not quiet and sys.stderr.isatty() else None
    try:
        report = sync_once(settings, replay=replay, progress=line)
    finally:
        if line is not None:
            line.clear()
    if not quiet:
        for detail in report.details():
            click.echo(f"ff-sync: {one_line(detail, settings.backend_store_uri)}", err=True)
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
    "restoring its database from a backup); converges to the same state.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress and no detail lines.")
@click.pass_context
def main(
    ctx: click.Context,
    config: Path | None,
    tracking_uri: str | None,
    spool_root: Path | None,
    replay: bool,
    quiet: bool,
) -> None:
    """Replay spooled runs into the MLflow tracking store, exactly once.

    Without a command: one pass over everything pending under the spool root, ending with a
    one-line summary.

    \b
    Exit codes:
      0   everything pending was synced
      1   synced, but some records were quarantined or refused (see the quarantine report)
      2   usage or configuration error (also: MLflow not installed)
      75  destination unavailable, or another ff-sync holds its lock: try again later
      70  internal error (a bug; FF_DEBUG=1 shows the traceback)
    """
    ctx.obj = SyncOptions(config, tracking_uri, spool_root)
    if ctx.invoked_subcommand is not None:
        return
    code = _run(lambda: _sync(ctx.obj, replay, quiet))
    ctx.exit(code if code != EXIT_OK else EXIT_OK)
