"""The `linearize` command line. Each command parses its options and calls a library function; one module per
group of commands, all registered on the one Typer `app`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ..families import FAMILIES
from . import convert, demo, finetune, measure, push  # noqa: F401  (each module registers its commands on `app`)
from .common import app

__all__ = ["app"]


@app.command()
def version() -> None:
    """Print the versions of linearize and the libraries it runs on."""
    import torch
    import transformers

    print(
        f"linearize {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {sys.version.split()[0]}; families: {', '.join(FAMILIES)}"
    )


def _print_version(asked: bool) -> None:
    if asked:
        version()
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", help="Print the versions and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """The options of `linearize` itself (the app's help says what it does)."""
