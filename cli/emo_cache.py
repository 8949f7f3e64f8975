"""`emo-cache`: check a dataset, build the faces store, build the features store, merge shards.

No command module imports torch at import time (``emo-cache --help``, ``check`` and ``faces`` never load
it); ``extract`` imports it inside its command.
"""
from pathlib import Path

import click

from emotion_attention.cli.cache_extract import extract
from emotion_attention.cli.cache_faces import check, faces
from emotion_attention.cli.cache_salvage import salvage
from emotion_attention.cli.common import UserErrorGroup


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Check a dataset, align its faces into a faces store, cache backbone maps."""


main.add_command(check)
main.add_command(faces)
main.add_command(extract)
main.add_command(salvage)


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def merge(out: Path, shards: tuple[Path, ...]) -> None:
    """Join the SHARDS of one `--shard K/N` run (faces stores, or features stores) into OUT.

    The clips are copied (chunk by chunk, no decoding), so OUT stands alone once written; shards whose
    settings differ, or that share a clip, are refused. Resumable: clips already in OUT are skipped.
    """
    from emotion_attention.cache.merge import merge_stores

    merge_stores(out, list(shards), log=click.echo)
