"""`linearize push`: publish a model folder to the Hugging Face Hub with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import app, console, exits_on_error, human_size, stdout_console


@app.command(
    epilog="Examples:\n\n"
    "  linearize push smollm2-liger my-user/smollm2-135m-liger --dry-run   # files, sizes and the card\n\n"
    "  linearize push runs/liger/model my-org/smollm2-liger --private\n\n"
    "  HF_TOKEN=hf_... linearize push smollm2-liger my-user/smollm2-liger --revision v2 --quiet"
)
@exits_on_error(interrupted="interrupted before the Hub confirmed the commit: the push is not done")
def push(
    folder: Annotated[Path, typer.Argument(help="A converted (or fine-tuned) model folder; it is not modified.")],
    repo_id: Annotated[
        str, typer.Argument(metavar="ORG/NAME", help="The Hub repo: your user name or an organization, then a name.")
    ],
    private: Annotated[
        bool,
        typer.Option(
            "--private",
            help="Create the repo private (without it, a new repo gets the account's default visibility; an existing "
            "repo keeps its own).",
        ),
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(help="Branch to commit to, created if missing (default: the main branch).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the folder (its config and the safetensors headers, not the weights) and print the files, "
            "their sizes and the model card; send nothing.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="First load the folder and generate a few tokens in a fresh process (skip it only for a model "
            "too large for this machine).",
        ),
    ] = True,
    token: Annotated[
        str | None,
        typer.Option(
            help="Hub token with write access (default: HF_TOKEN, then `hf auth login`'s).", show_default=False
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Hub URL (default: HF_ENDPOINT, then https://huggingface.co).", show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final URL.")] = False,
) -> None:
    """Publish FOLDER to the Hugging Face Hub as ORG/NAME with a generated model card.

    The card (README.md) records the base model, the method and its parameters, which layers were converted, the
    fine-tuning recipe, the latest `linearize eval` and `linearize bench` tables and how to load the model. The
    folder and the card go up in one commit: the push is reported done only once the Hub accepted it."""
    from ..publish import plan_push
    from ..publish import push as push_folder

    if dry_run:
        _print_push_plan(plan_push(folder, repo_id, private=private, revision=revision), endpoint)
        return
    url = push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        token=token,
        endpoint=endpoint,
        quiet=quiet,
        verify=verify,
        on_step=None if quiet else _print_step,
    )
    if quiet:
        print(url)
    else:
        console.print(f"[green]Pushed[/] {url}", highlight=False, soft_wrap=True)


def _print_step(text: str) -> None:
    console.print(escape(text), highlight=False, soft_wrap=True)  # the folder's path may hold [brackets]


def _print_push_plan(plan, endpoint: str | None) -> None:
    from huggingface_hub import constants

    from ..publish import shown_endpoint

    out = stdout_console()
    target = f"{shown_endpoint(endpoint or constants.ENDPOINT)}/{plan.repo_id}"
    where = f"branch {plan.revision}" if plan.revision else "the main branch"
    table = Table(
        title=f"Push plan: {escape(str(plan.folder))} -> {target} ({where}{', private' if plan.private else ''})"
    )
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in plan.files:
        table.add_row(escape(path), human_size(size))
    table.add_row(f"{len(plan.files)} files, one commit", human_size(plan.total_bytes), style="bold")
    out.print(table)
    for entry in plan.left_out:
        out.print(f"Not sent: {escape(entry)}", highlight=False)
    out.rule("README.md (generated model card)")
    print(plan.card)  # plain print: the card's [links] must not be read as rich markup
