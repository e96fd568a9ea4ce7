"""`mstar status` (not implemented yet)."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def status(args: tuple[str, ...]) -> None:
    """Not implemented yet."""
    click.echo("mstar: error: 'status' is not implemented yet", err=True)
    sys.exit(2)
