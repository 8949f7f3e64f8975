"""`emo-cache`: check a dataset, build the faces store, build the features store."""
import click

from cli.common import UserErrorGroup

from cli.cache_extract import extract
from cli.cache_faces import check, faces


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Check a dataset, align its faces into a faces store, cache backbone maps."""


main.add_command(check)
main.add_command(faces)
main.add_command(extract)
