"""The `linearize` command line. Each command parses its options and calls a library function; one module per
group of commands, all registered on the one Typer `app`."""

from __future__ import annotations

import codecs
import inspect
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
    _escape_unencodable(sys.stdout)


_ESCAPED = "linearize-escaped"  # the error handler `_escape_unencodable` gives stdout


def _escape_unencodable(stream) -> None:
    """Print what `stream`'s encoding cannot hold escaped (`\\u4e2d`): a reply streamed to a pipe in cp1252 (Windows)
    or a terminal in Latin-1 stopped at its first such character. Bytes a C locale read from the command line (its
    surrogate escapes) are still written back as they were."""
    if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
        codecs.register_error(_ESCAPED, _escaped)
        stream.reconfigure(errors=_ESCAPED)


def _escaped(error: UnicodeEncodeError) -> tuple[str | bytes, int]:
    failed = error.object[error.start : error.end]
    if all("\udc80" <= char <= "\udcff" for char in failed):  # a byte that was not text where it was read
        return codecs.lookup_error("surrogateescape")(error)
    return codecs.backslashreplace_errors(error)


def _one_line_paragraphs(doc: str | None) -> str | None:
    """`doc` with each paragraph joined into one line: Typer's rich help keeps a docstring's single line breaks,
    which break a summary mid-sentence in the command list and leave ragged lines in a command's help."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


for _typer in (app, *(group.typer_instance for group in app.registered_groups)):
    for _command in _typer.registered_commands:
        _command.help = _one_line_paragraphs(_command.help or _command.callback.__doc__)
