"""`linearize finetune` and `linearize recipe init|validate`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LinearizeError
from .common import METHOD_HELP, Method, app, console, exits_on_error, spinner, stdout_console


@app.command(
    epilog="Examples:\n\n"
    "  linearize recipe init --method liger -o liger.yaml\n\n"
    "  linearize finetune liger.yaml                          # one process\n\n"
    "  linearize finetune liger.yaml stages.1.epochs=2 training.grad_accum=4\n\n"
    "  torchrun --nproc_per_node 2 -m linearize finetune liger.yaml   # data parallel"
)
@exits_on_error(
    interrupted="interrupted; checkpoints written so far are kept: rerun the same command (overrides included)"
    " with --resume to continue"
)
def finetune(
    recipe_file: Annotated[
        Path, typer.Argument(metavar="RECIPE.yaml", help="The recipe (see `linearize recipe init`).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[KEY=VALUE]...",
            help="Recipe overrides by dotted path, value in YAML: stages.0.optimizer.lr=1e-3 output.dir=runs/x",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in output.dir from its latest checkpoint, with the same recipe and data but for "
            "the bookkeeping: training.eval_every, eval_batches, checkpoint_every, keep_checkpoints, "
            "gradient_checkpointing and output.merge_lora may change.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate the recipe, read the data and print the plan; load no weights, train nothing."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress output: warnings, and the saved model's folder on stdout (metrics.jsonl is still "
            "written).",
        ),
    ] = False,
) -> None:
    """Fine-tune a converted model from a recipe: attention transfer and/or LoRA, then save it.

    The run folder (output.dir) gets the resolved recipe, metrics.jsonl, checkpoints/ and, at the end, model/
    (a converted model folder, LoRA merged by default). One run trains into it at a time: a second is refused."""
    from ..training.recipe import load_recipe

    recipe = load_recipe(recipe_file, overrides or [])
    if dry_run:
        plan = _finetune_plan(recipe, resume, quiet)  # every process checks what it would meet; one prints
        if _first_process():
            stdout_console().print(plan)
        return
    from ..training.trainer import finetune as run_finetune

    out = run_finetune(recipe, resume=resume, quiet=quiet, console=console)
    if not _first_process():
        return
    if quiet:
        print(out)  # the result alone, for a script: model=$(linearize finetune recipe.yaml -q)
    else:
        console.print(_saved(out, recipe), highlight=False, soft_wrap=True)


def _saved(out: Path, recipe) -> str:
    """The run's last line: where the model is and what to run next (a push, unless the run pushed it), or how to
    load it with the adapter kept apart (`output.merge_lora: false`), which the commands would say it lacks."""
    adapter = out.parent / "adapter"
    if adapter.is_dir():
        return (
            f"[green]Saved[/] {escape(str(out))} without its LoRA, the adapter in {escape(str(adapter))}: load both "
            f"with AutoPeftModelForCausalLM.from_pretrained('{escape(str(adapter))}') after `import linearize`"
        )
    folder, against = escape(shlex.quote(str(out))), escape(shlex.quote(recipe.model.name or "embedded"))
    commands = [f"linearize eval {folder} --against {against}", f"linearize generate {folder} PROMPT"]
    commands += [] if recipe.output.push_to_hub else [f"linearize push {folder} ORG/NAME"]
    return f"[green]Saved[/] {escape(str(out))}. Next: " + ", ".join(f"`{command}`" for command in commands)


def _first_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


def _finetune_plan(recipe, resume: bool, quiet: bool) -> Table:
    from .. import sources
    from ..hub import check_can_push
    from ..training.checkpoint import check_resumable, list_checkpoints, prepare_run_folder
    from ..training.checks import (
        check_calibration,
        check_lora_targets,
        check_stage_order,
        check_transfer_trains,
        lora_targets,
        recipe_notes,
        stage_steps,
        unmatched_targets_note,
        warmup_note,
    )
    from ..training.data import load_data
    from ..training.fingerprints import data_fingerprint

    conv, t = recipe.conversion, recipe.training
    source = recipe.model.name or sources.EMBEDDED_NAME
    source_config = sources.load_config(recipe.model.name, recipe.model.revision)
    plan = conv.plan(source_config, source)
    run = Path(recipe.output.dir)
    notes: list[str] = []
    start = prepare_run_folder(run, recipe, resume, note=notes.append)
    table = Table(title=f"Fine-tuning plan: {escape(source)} -> {conv.method}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("method", plan.method_text())
    for layers, fate in plan.layer_groups():
        table.add_row(f"layers {layers}", fate)
    request = conv.selection_request()
    if request is not None:
        when = "after the attention transfer" if conv.selects_after_transfer else "before training"
        table.add_row(
            "kept as softmax",
            f"{request.rule} ({request.scorer}, on {request.calibration}), chosen {when}",
        )
    targets = lora_targets(plan.config, recipe.lora.target_modules)
    check_lora_targets(recipe, targets)
    if note := unmatched_targets_note(recipe, targets):
        notes.append(note)
    check_transfer_trains(recipe, plan.config, targets.in_attention)
    # the data as the run reads it (the tokenizer alone, no weights): its errors, packs and steps
    with spinner("Reading the data", quiet=quiet or not _first_process()):
        tokenizer = sources.load_tokenizer(recipe.model.name, recipe.model.revision)
        data = load_data(recipe.data, tokenizer, t.seed)
        check_calibration(recipe, tokenizer)
    notes += [*data.warnings, *recipe_notes(recipe, source_config, data.train)]
    sources_text = escape(", ".join(s.label for s in recipe.data.sources))  # "[train]" is not rich markup
    table.add_row("data", f"{sources_text}; packs of {recipe.data.seq_len} tokens, held out {recipe.data.held_out}")
    for note in data.notes:
        table.add_row("", escape(note))
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun, as the run will count them
    check_stage_order(recipe, processes)
    if start is not None:  # what the run would refuse about the checkpoint, now
        check_resumable(start, recipe, processes, data_fingerprint(data))
    table.add_row("batch", f"{t.micro_batch_size} x {t.grad_accum} accumulation per process, {processes} process(es)")
    for i, stage in enumerate(recipe.stages):
        steps = stage_steps(stage, len(data.train), t, processes)[0]
        length = f"{steps} steps" + ("" if stage.max_steps else f" ({stage.epochs:g} epoch{'s' * (stage.epochs != 1)})")
        if note := warmup_note(i, stage, steps):
            notes.append(note)
        table.add_row(
            f"stage {i + 1}",
            f"{stage.kind}: trains {', '.join(stage.trainable)}; {length}; {stage.optimizer.name} "
            f"lr {stage.optimizer.lr:g}"
            + _added_parameters(stage.optimizer)
            + f", {stage.schedule.kind} schedule"
            + (f"; distils the original (kd_ratio {stage.kd_ratio:g})" if stage.kd_ratio else ""),
        )
    table.add_row("LoRA", f"r {recipe.lora.r}, alpha {recipe.lora.alpha:g} on {', '.join(recipe.lora.target_modules)}")
    table.add_row("output", escape(f"{run}/model") + (" (LoRA merged)" if recipe.output.merge_lora else " + adapter/"))
    if recipe.output.push_to_hub:
        visibility = "private" if recipe.output.private else "a new repo: the account's default visibility"
        table.add_row("push", f"{run}/model to {recipe.output.push_to_hub} ({visibility}), once saved")
        try:
            check_can_push()
        except LinearizeError as error:
            notes.append(f"the push would fail now: {error}")
    if resume:
        table.add_row("resume", escape(str(start)) if start else "no checkpoint yet: starts from the beginning")
    elif list_checkpoints(run):
        table.add_row("resume", "checkpoints exist: pass --resume")
    for note in notes:
        table.add_row("note", escape(note))  # notes name paths and sources ("builtin english [test]")
    return table


def _added_parameters(optimizer) -> str:
    """' (added parameters muon lr 0.0001)': how the method's new parameters train, where it differs."""
    parts = [optimizer.new_name] if optimizer.new_name and optimizer.new_name != optimizer.name else []
    parts += [f"lr {optimizer.new_lr:g}"] if optimizer.new_lr else []
    return f" (added parameters {' '.join(parts)})" if parts else ""


recipe_app = typer.Typer(help="Create and check fine-tuning recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("init")
@exits_on_error()
def recipe_init(
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = "liger",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the recipe to this file instead of printing it (an existing file is kept unless --force).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --output file if it exists.")] = False,
) -> None:
    """Print a commented starting recipe for METHOD, or write it to a file (-o)."""
    from ..training.recipe_template import recipe_template, write_recipe_template

    if output is None:
        if force:
            raise LinearizeError("--force replaces the --output file; add -o FILE, or leave --force out")
        print(recipe_template(method.value), end="")
        return
    written = write_recipe_template(output, method.value, force)
    written = escape(str(written))  # a path may hold [brackets]
    console.print(
        f"[green]Wrote[/] {written}; edit it, then run `linearize finetune {written}`", highlight=False, soft_wrap=True
    )


@recipe_app.command("validate")
@exits_on_error()
def recipe_validate(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE.yaml", help="The recipe to check.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Overrides, as for finetune.", show_default=False),
    ] = None,
    show: Annotated[
        bool,
        typer.Option(
            "--show",
            help="Also print the resolved recipe, defaults filled in (null method settings: the method's default).",
        ),
    ] = False,
) -> None:
    """Check RECIPE.yaml without loading anything: syntax, keys, types and value ranges."""
    from ..training.recipe import load_recipe, resolved_yaml

    recipe = load_recipe(recipe_file, overrides or [])
    if show:
        print(resolved_yaml(recipe), end="")
    console.print(
        f"[green]OK[/] {escape(str(recipe_file))}: {len(recipe.stages)} stage(s), method {recipe.conversion.method}",
        highlight=False,
        soft_wrap=True,
    )
