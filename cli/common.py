"""What every entry point shares: a ``UserError`` becomes one message and a non-zero exit, never a traceback.

Bugs (``ValueError`` and the rest) still show their tracebacks. Each entry point is built with
``cls=UserErrorGroup`` or ``cls=UserErrorCommand``.
"""
from __future__ import annotations

import sys

import click

from emotion_attention.cache.errors import UserError


class UserFacingError(click.ClickException):
    """click prints ``Error: <message>`` on stderr and exits with the error's code."""

    def __init__(self, exc: UserError):
        super().__init__(str(exc))
        self.exit_code = exc.exit_code


class _UserErrors:
    def parse_args(self, ctx: click.Context, args: list):  # an option's callback may raise one (--config FILE)
        try:
            return super().parse_args(ctx, args)
        except UserError as exc:
            raise UserFacingError(exc) from exc

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise UserFacingError(exc) from exc


class UserErrorGroup(_UserErrors, click.Group):
    """A click group whose subcommands turn UserError into a one-line message."""


class UserErrorCommand(_UserErrors, click.Command):
    """A click command that turns UserError into a one-line message."""


def split_classes(value: str | None) -> tuple[str, ...] | None:
    """``--classes A,B,C`` -> ("A", "B", "C"); refuses duplicates and a value that names no class."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise click.BadParameter(f"{value!r} names no class; give e.g. --classes Angry,Happy,Sad",
                                 param_hint="--classes")
    folded = [n.lower() for n in names]  # labels match case-insensitively, so "Happy,happy" is a duplicate
    dup = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
    if dup:
        raise click.BadParameter(f"{', '.join(dup)} given more than once (class names are case-insensitive)",
                                 param_hint="--classes")
    return names


def finish(summary) -> None:
    """Print a stage's summary (warnings on stderr) and exit 1 when it did not succeed."""
    text = summary.format()
    if text:
        click.echo(text)
    for line in summary.warnings:
        click.echo(line, err=True)
    if not summary.ok:
        sys.exit(1)
