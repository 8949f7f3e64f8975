"""`emo-cache`: check a dataset, build the faces store, build the features store, salvage and merge stores.

Each stage command's options are generated from its config (``pipeline/configs.py``) and the command calls
the stage's ``run``; the stage module is imported inside the command, so ``--help`` imports neither torch nor
h5py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from emotion_attention.cli.common import UserErrorCommand, UserErrorGroup, finish
from emotion_attention.cli.options import ConfigOptions, stage_command
from emotion_attention.pipeline.configs import CheckConfig, ExtractConfig, PreprocessConfig

CHECK, FACES = ConfigOptions(CheckConfig), ConfigOptions(PreprocessConfig)
EXTRACT = ConfigOptions(ExtractConfig, usage_error=True)  # extract has always answered a bad value with exit 2
RUN = {"data": ("inputs", 0), "out": ("out",)}  # where a saved config holds the arguments of check and faces


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Check a dataset, align its faces into a faces store, cache backbone maps."""


@stage_command("check", "check", CHECK, sources=RUN, replays=("faces",))
@click.argument("data", type=click.Path(exists=True, path_type=Path))
def check(data: Path, quiet: bool, **params) -> None:
    """Report clips per split x class (and per fold) and every problem (each naming its file); every video is
    decoded to the end, so a truncated or damaged one is an error. Exit 1 on errors."""
    from emotion_attention.pipeline.stages import check as stage  # lazy: decoding imports OpenCV

    finish(stage.run(CHECK.build(params), [data], None, progress=not quiet))


@stage_command("faces", "faces", FACES, sources=RUN)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Faces store to create or resume (.h5).")
def faces(data: Path, out: Path, quiet: bool, **params) -> None:
    """Align every clip's faces into the faces store OUT (resumable; failures in OUT.failures.jsonl)."""
    from tqdm import tqdm  # lazy, with the stage: lines go above its progress bar

    from emotion_attention.pipeline.stages import faces as stage  # lazy: dlib, OpenCV, h5py

    finish(stage.run(FACES.build(params), [data], out, log=tqdm.write, progress=not quiet))


@stage_command("extract", "extract", EXTRACT, sources={"faces_path": ("inputs", 0), "out": ("out",)})
@click.argument("faces_path", metavar="FACES.h5", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Features store to create or resume (.h5); one file per backbone setting.")
def extract(faces_path: Path, out: Path, quiet: bool, **params) -> None:
    """Cache backbone maps of every face in FACES.h5 into the features store OUT (resumable)."""
    from emotion_attention.pipeline.stages import extract as stage  # lazy: torch

    finish(stage.run(EXTRACT.build(params), [faces_path], out, log=click.echo, progress=not quiet))


main.add_command(check)
main.add_command(faces)
main.add_command(extract)


@main.command(cls=UserErrorCommand)
@click.argument("store", metavar="STORE.h5", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Only read every clip and list the ones that are damaged or"
              " incomplete; change nothing (exit 1 when any is).")
def salvage(store: Path, check: bool) -> None:
    """Salvage STORE.h5 (a faces or features store) after a crash, a full disk or damaged bytes.

    Every complete clip whose data reads back whole (checksums, no truncation, finite maps) is copied into
    a fresh STORE.h5; the original file is kept unchanged beside it as STORE.h5.damaged-<time>. Then rerun
    the stage that builds the store: it skips the kept clips and redoes the dropped ones.
    """
    from emotion_attention.cache.common import check_store  # lazy: h5py
    from emotion_attention.cache.common import salvage as salvage_store  # lazy: keeps this module's import (and --help) cheap

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


@main.command(cls=UserErrorCommand)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def merge(out: Path, shards: tuple[Path, ...]) -> None:
    """Join the SHARDS of one `--shard K/N` run (faces stores, or features stores) into OUT.

    The clips are copied (chunk by chunk, no decoding), so OUT stands alone once written; shards whose
    settings differ, or that share a clip, are refused. Resumable: clips already in OUT are skipped.
    """
    from emotion_attention.cache.merge import merge_stores  # lazy: h5py

    merge_stores(out, list(shards), log=click.echo)
