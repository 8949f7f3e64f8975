"""`emo-cache salvage STORE`: copy a damaged store's readable complete clips into a fresh file in its place."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from emotion_attention.cache.common import check_store
from emotion_attention.cache.common import salvage as salvage_store
from emotion_attention.cli.common import UserErrorCommand


@click.command(cls=UserErrorCommand)
@click.argument("store", metavar="STORE.h5", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Only read every clip and list the ones that are damaged or"
              " incomplete; change nothing (exit 1 when any is).")
def salvage(store: Path, check: bool) -> None:
    """Salvage STORE.h5 (a faces or features store) after a crash, a full disk or damaged bytes.

    Every complete clip whose data reads back whole (checksums, no truncation, finite maps) is copied into
    a fresh STORE.h5; the original file is kept unchanged beside it as STORE.h5.damaged-<time>. Then rerun
    the stage that builds the store: it skips the kept clips and redoes the dropped ones.
    """
    if check:
        problems = check_store(store)
        for clip_id, why in problems:
            click.echo(f"{clip_id}: {why}")
        click.echo(f"{store}: {len(problems)} problem(s)" + (f"; `emo-cache salvage {store}` keeps every clip that"
                                                             " reads back whole" if problems else ""))
        sys.exit(1 if problems else 0)
    report = salvage_store(store)
    for clip_id, why in report.dropped:
        click.echo(f"dropped {clip_id}: {why}")
    click.echo(f"{report.path}: salvaged {report.kind}, {len(report.kept)} clip(s) kept, {len(report.dropped)}"
               f" dropped; the original file is kept as {report.damaged_copy}")
    if report.dropped:
        click.echo(f"rerun `{report.stage}` with the same settings to redo the dropped clips")
