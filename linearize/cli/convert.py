"""`linearize convert` and `linearize generate`: make a converted model folder, and sample from one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import LinearizeError
from .common import METHOD_HELP, Dtype, Method, app, console, fail, human_size

_PASS_TOKENIZER = "pass --tokenizer PATH_OR_ID (a folder or hub id with the same model's tokenizer)"


def _plan_table(plan) -> Table:
    from ..convert import PLAN_CONTEXT

    table = Table(title=f"Conversion plan: {plan.source} -> {plan.settings['method']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("family", plan.config.base_model_type)
    params = {k: v for k, v in plan.settings.items() if k not in ("method", "softmax_layers")}
    table.add_row("method", f"{plan.settings['method']}  {params}")
    for layers, fate in plan.layer_groups():
        table.add_row(f"layers {layers}", fate)
    added = plan.converted_parameters - plan.source_parameters
    table.add_row("parameters", f"{plan.source_parameters:,} (+{added:,} added)")
    ctx = PLAN_CONTEXT
    table.add_row(
        f"cache / sequence at {ctx} tokens",
        f"{human_size(plan.converted_cache_bytes(ctx))} (original KV cache: {human_size(plan.kv_cache_bytes(ctx))})",
    )
    table.add_row("cache grows with context", _cache_growth(plan))
    return table


def _cache_growth(plan) -> str:
    from ..convert import PLAN_CONTEXT
    from ..methods import get_method

    softmax = len(plan.config.linearize["softmax_layers"])
    converted_growth = plan.converted_cache_bytes(2 * PLAN_CONTEXT) - plan.converted_cache_bytes(PLAN_CONTEXT)
    converted_growth -= plan.kv_cache_bytes(PLAN_CONTEXT, softmax)
    parts = []
    if converted_growth:
        per_1k = converted_growth / (PLAN_CONTEXT / 1024)
        reason = get_method(plan.settings["method"]).cache_growth
        parts.append(f"in the converted layers by {human_size(per_1k)} per 1K tokens ({reason})")
    if softmax:
        parts.append(f"in the {softmax} softmax layers")
    return "yes: " + "; ".join(parts) if parts else "no"


@app.command(
    epilog="Examples:\n\n"
    "  linearize convert -o smollm2-liger                  # the embedded SmolLM2-135M, Liger\n\n"
    "  linearize convert Qwen/Qwen3-0.6B -m swa -o q3-swa  # training-free baseline\n\n"
    "  linearize convert ./my-llama --softmax-layers every:8 --dry-run"
)
def convert(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Source model: a Hugging Face Hub id (org/name) or a local folder. Omit it to convert the embedded "
            "default, SmolLM2-135M-Instruct, which works offline.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = "liger",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder to write the converted model to (required unless --dry-run).",
            show_default=False,
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            help="Keys each query sees in the window branch, itself included (liger: 64; swa: 64, sinks included; "
            "parallax: all earlier keys unless set).",
            show_default=False,
        ),
    ] = None,
    sinks: Annotated[
        int | None,
        typer.Option(
            help="First tokens every query also sees in the window branch (swa: 4; liger: 0, as in the paper).",
            show_default=False,
        ),
    ] = None,
    mix: Annotated[
        float | None,
        typer.Option(
            help="liger: weight of the window branch; the gated linear branch gets 1 - mix (default 0.5, the paper).",
            show_default=False,
        ),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(help="still: tokens per chunk, the unit of selection (default 64).", show_default=False),
    ] = None,
    topk: Annotated[
        float | None,
        typer.Option(
            help="still: salient tokens kept per chunk and head, as a count (4) or a ratio of the chunk (0.0625).",
            show_default=False,
        ),
    ] = None,
    softmax_layers: Annotated[
        str | None,
        typer.Option(
            help="Layers kept as the original softmax attention: '0,8,16' or 'every:8' (layers 0, 8, 16, ...).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[Dtype, typer.Option(help="Dtype of the saved weights; auto keeps the source's.")] = "auto",
    device: Annotated[str, typer.Option(help="Device for loading and --verify: auto, cpu, cuda, cuda:1, ...")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (layers, parameters, cache size) "
            "from the source config alone; load no weights, write nothing.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="After saving, compare perplexity on built-in text and a greedy sample, source vs converted.",
        ),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="ORG/NAME",
            help="After saving, publish the folder as `linearize push OUTPUT ORG/NAME` does (token and repo id "
            "are checked before converting).",
            show_default=False,
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    tokenizer_source: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            metavar="PATH_OR_ID",
            help="Save this folder's or hub id's tokenizer with the output instead of MODEL's own (for a checkpoint "
            "without tokenizer files).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Convert MODEL's attention layers to a linear or hybrid method and save a loadable model folder."""
    from .. import sources
    from ..convert import convert_model, plan_conversion, save_model
    from ..generation import pick_device
    from ..outputs import check_output_folder

    method_name = method.value
    try:
        if not dry_run and output is None:
            raise LinearizeError("pass an output folder with -o/--output (or use --dry-run)")
        if output is not None and not dry_run:
            check_output_folder(output, force, source=model)
        if push_to_hub and not dry_run:
            _check_push_target(push_to_hub)
        with console.status("Reading the source config"):
            source_config = sources.load_config(model)
        plan = plan_conversion(
            source_config,
            model or sources.EMBEDDED_NAME,
            method_name,
            softmax_layers,
            dtype.value,
            window=window,
            sinks=sinks,
            mix=mix,
            chunk_size=chunk_size,
            topk=topk,
        )
        console.print(_plan_table(plan))
        if dry_run:
            return
        device = pick_device(device)
        with console.status(f"Loading {model or sources.EMBEDDED_NAME}"):
            source_model, tokenizer, _ = sources.load(
                model,
                dtype=dtype.value,
                device=device,
                tokenizer=tokenizer_source,
                tokenizer_fix=f"{_PASS_TOKENIZER}, or drop --verify" if verify else None,
            )
        with console.status("Converting and saving"):
            converted = convert_model(source_model, plan.config)
            save_model(converted, tokenizer, output, force=force)
        console.print(
            f"[green]Saved[/] {output}. Load it with `import linearize` then "
            f"AutoModelForCausalLM.from_pretrained('{output}'), or with trust_remote_code=True."
        )
        if tokenizer is None:
            console.print(
                f"[yellow]Warning:[/] '{model}' has no tokenizer, so neither has {output}; `generate` and `eval` "
                f"need one. Convert again and {_PASS_TOKENIZER}, or copy the same model's tokenizer files into it.",
                highlight=False,
            )
        if verify:
            _verify(source_model, output, tokenizer, device)
        if push_to_hub:
            _push(output, push_to_hub, private=private)
    except LinearizeError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; no output folder was written", 130) from None


def _verify(source_model, output: Path, tokenizer, device: str) -> None:
    from ..evaluation import compare
    from ..generation import load_for_inference

    converted, _ = load_for_inference(str(output), device=device)
    with console.status("Measuring perplexity and sampling"):
        rows = compare(
            {"original": source_model.float(), "converted": converted},
            tokenizer,
            prompt="Explain in one sentence why the sky is blue.",
        )
    table = Table(title="Original vs converted (built-in text, 4 x 512 tokens; greedy sample)")
    for column in ("model", "perplexity", "sample"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], f"{row['perplexity']:.2f}", row["sample"].strip().replace("\n", " "))
    Console().print(table)


def _check_push_target(repo_id: str) -> None:
    from ..publish import check_can_push, check_repo_id

    check_repo_id(repo_id)
    check_can_push()


def _push(output: Path, repo_id: str, *, private: bool) -> None:
    from ..publish import push

    saved = f"The converted folder {output} is saved: push it with `linearize push`."
    try:
        url = push(output, repo_id, private=private, on_step=lambda text: console.print(text, highlight=False))
    except LinearizeError as error:
        raise LinearizeError(f"{error} {saved}") from None
    except KeyboardInterrupt:
        raise fail(f"interrupted before the Hub confirmed the commit: the push is not done. {saved}", 130) from None
    console.print(f"[green]Pushed[/] {url}", highlight=False)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A converted model folder (or any causal LM folder / hub id).")],
    prompt: Annotated[str, typer.Argument(help="The prompt; wrapped in the chat template when the tokenizer has one.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 decodes greedily.")] = 0.0,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Force the chat template on or off (default: on when the tokenizer has one).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Stream a completion of PROMPT from MODEL, decoding with the model's constant-size cache."""
    from transformers import TextStreamer

    from ..generation import generate as generate_text
    from ..generation import load_for_inference

    try:
        with console.status(f"Loading {model}"):
            loaded, tokenizer = load_for_inference(model, device=device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_text(loaded, tokenizer, prompt, max_new_tokens, chat, temperature, streamer=streamer)
    except (LinearizeError, ValueError) as error:
        raise fail(str(error)) from None
