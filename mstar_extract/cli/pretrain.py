"""`mstar pretrain` (not implemented yet)."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pretrain(args: tuple[str, ...]) -> None:
    """Not implemented yet."""
    click.echo("mstar: error: 'pretrain' is not implemented yet", err=True)
    sys.exit(2)
