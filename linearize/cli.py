"""The `linearize` command line. Each command parses its options and calls a library function."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import LinearizeError
from .families import FAMILIES
from .methods import METHODS

app = typer.Typer(
    help="Convert pretrained Hugging Face LLMs from softmax attention to linear or hybrid attention.\n\n"
    "Note: 'Liger' here is the linearization method (Lan et al., 2025), unrelated to LinkedIn's Liger-Kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
Method = Enum("Method", {name.replace("-", "_"): name for name in METHODS}, type=str)
Dtype = Enum("Dtype", {name: name for name in ("auto", "float32", "bfloat16", "float16")}, type=str)
_METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _plan_table(plan) -> Table:
    from .convert import PLAN_CONTEXT

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
        f"{_size(plan.converted_cache_bytes(ctx))} (original KV cache: {_size(plan.kv_cache_bytes(ctx))})",
    )
    table.add_row("cache grows with context", _cache_growth(plan))
    return table


def _cache_growth(plan) -> str:
    from .convert import PLAN_CONTEXT

    softmax = len(plan.config.linearize["softmax_layers"])
    converted_growth = plan.converted_cache_bytes(2 * PLAN_CONTEXT) - plan.converted_cache_bytes(PLAN_CONTEXT)
    converted_growth -= plan.kv_cache_bytes(PLAN_CONTEXT, softmax)
    parts = []
    if converted_growth:
        per_1k = converted_growth / (PLAN_CONTEXT / 1024)
        parts.append(f"in the converted layers by {_size(per_1k)} per 1K tokens (salient tokens)")
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
    method: Annotated[Method, typer.Option("--method", "-m", help=_METHOD_HELP)] = "liger",
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
            help="Keys each query sees in the window branch, itself included (liger: 64; swa: 64, sinks included).",
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
) -> None:
    """Convert MODEL's attention layers to a linear or hybrid method and save a loadable model folder."""
    from . import sources
    from .convert import check_output_folder, convert_model, plan_conversion, save_model
    from .generation import pick_device

    method_name = method.value
    try:
        if not dry_run and output is None:
            raise LinearizeError("pass an output folder with -o/--output (or use --dry-run)")
        if output is not None and not dry_run:
            check_output_folder(output, force)
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
            chunk_size=chunk_size,
            topk=topk,
        )
        console.print(_plan_table(plan))
        if dry_run:
            return
        device = pick_device(device)
        with console.status(f"Loading {model or sources.EMBEDDED_NAME}"):
            source_model, tokenizer, _ = sources.load(model, dtype=dtype.value, device=device)
        with console.status("Converting and saving"):
            converted = convert_model(source_model, plan.config)
            save_model(converted, tokenizer, output, force=force)
        console.print(
            f"[green]Saved[/] {output}. Load it with `import linearize` then "
            f"AutoModelForCausalLM.from_pretrained('{output}'), or with trust_remote_code=True."
        )
        if verify:
            _verify(source_model, output, tokenizer, device)
        if push_to_hub:
            _push(output, push_to_hub, private=private)
    except LinearizeError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; no output folder was written", 130) from None


def _verify(source_model, output: Path, tokenizer, device: str) -> None:
    from .evaluation import compare
    from .generation import load_for_inference

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
    from .publish import check_can_push, check_repo_id

    check_repo_id(repo_id)
    check_can_push()


def _push(output: Path, repo_id: str, *, private: bool) -> None:
    from .publish import push

    saved = f"The converted folder {output} is saved: push it with `linearize push`."
    try:
        url = push(output, repo_id, private=private, on_step=lambda text: console.print(text, highlight=False))
    except LinearizeError as error:
        raise LinearizeError(f"{error} {saved}") from None
    except KeyboardInterrupt:
        raise _fail(f"interrupted before the Hub confirmed the commit: the push is not done. {saved}", 130) from None
    console.print(f"[green]Pushed[/] {url}", highlight=False)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A converted model folder (or any causal LM folder / hub id).")],
    prompt: Annotated[str, typer.Argument(help="The prompt; wrapped in the chat template when the tokenizer has one.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 decodes greedily.")] = 0.0,
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

    from .generation import generate as generate_text
    from .generation import load_for_inference

    try:
        with console.status(f"Loading {model}"):
            loaded, tokenizer = load_for_inference(model, device=device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_text(loaded, tokenizer, prompt, max_new_tokens, chat, temperature, streamer=streamer)
    except (LinearizeError, ValueError) as error:
        raise _fail(str(error)) from None


@contextmanager
def _progress(description: str, total: int, quiet: bool):
    """A progress bar on stderr when it is a terminal and not --quiet; yields the callback that advances it (or
    None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet or not console.is_terminal:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


@contextmanager
def _status(message: str, quiet: bool):
    if quiet:
        yield
    else:
        with console.status(message):
            yield


def _int_list(value: str, option: str) -> list[int]:
    """'256,1024' -> [256, 1024]; 'none' or '' -> []."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise LinearizeError(f"{option} takes comma-separated token counts, e.g. 512,2048; got {value!r}") from None
    if any(n < 2 for n in numbers):
        raise LinearizeError(f"{option}: every length must be at least 2 tokens; got {value!r}")
    return numbers


def _float_list(value: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise LinearizeError(f"{option} takes comma-separated fractions, e.g. 0,0.5,1; got {value!r}") from None


def _print_table(title: str, header: list[str], rows: list[list[str]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _write_outputs(payload: dict, specs, json_path: Path | None, record_name: str | None, quiet: bool) -> None:
    """--json PATH, and the record in MODEL's folder (None: --no-record)."""
    from .comparison import record, write_json

    written = [write_json(json_path, payload)] if json_path is not None else []
    if record_name is not None:
        written.append(record(specs[0], record_name, payload))
    for path in filter(None, written):
        if not quiet:
            console.print(f"[green]Wrote[/] {path}", highlight=False)


_MODEL_HELP = "A converted model folder, any causal LM folder or hub id, or 'embedded' (the embedded SmolLM2)."
_AGAINST_HELP = (
    "The model to compare with (same kinds as MODEL). Default: the source a converted folder records; nothing "
    "for other models."
)
_RECORD_HELP = "Do not write the results into MODEL's folder (linearize_eval.json / linearize_bench.json)."


@app.command(
    "eval",
    epilog="Examples:\n\n"
    "  linearize eval smollm2-liger --against embedded\n\n"
    "  linearize eval smollm2-liger --text 'data/*.txt' --context 1024 --passkey-contexts 512,2048\n\n"
    "  linearize eval smollm2-liger --text hf:wikitext:wikitext-2-raw-v1:test --json eval.json\n\n"
    "  linearize eval smollm2-liger --lm-eval hellaswag,arc_easy --lm-eval-limit 200",
)
def eval_command(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    against: Annotated[str | None, typer.Option(help=_AGAINST_HELP, show_default=False)] = None,
    text: Annotated[
        str,
        typer.Option(
            help="Perplexity text: 'builtin' (offline), a local file or glob (.txt/.md/.jsonl/.json/.parquet), or "
            "hf:NAME[:CONFIG][:SPLIT] for a Hugging Face dataset (split test by default)."
        ),
    ] = "builtin",
    context: Annotated[int, typer.Option(help="Tokens per perplexity window.", min=2)] = 512,
    windows: Annotated[int, typer.Option(help="Perplexity windows (at most; fewer if the text is short).", min=1)] = 8,
    passkey_contexts: Annotated[
        str, typer.Option(help="Passkey prompt lengths in tokens, comma-separated; 'none' skips the task.")
    ] = "256,1024",
    depths: Annotated[
        str, typer.Option(help="Where the key is hidden: fractions of the filler before it, comma-separated.")
    ] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option(help="Keys per passkey context and depth.", min=1)] = 2,
    distractors: Annotated[int, typer.Option(help="Wrong keys the true key is ranked against.", min=1)] = 9,
    seed: Annotated[int, typer.Option(help="Chooses the passkeys and distractors.")] = 0,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Comma-separated lm-evaluation-harness tasks, run through its HF model class "
            "(needs `pip install 'linearize\\[lm-eval]'`).",
            show_default=False,
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None, typer.Option(help="A folder of extra lm-eval task YAML files.", show_default=False)
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help="At most this many documents per lm-eval task.", show_default=False)
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.", show_default=False)
    ] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help=_RECORD_HELP)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="auto: float32 on CPU, the checkpoint's dtype elsewhere.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; the table only.")] = False,
) -> None:
    """Perplexity, passkey retrieval and (optionally) lm-eval tasks for MODEL and the model it is compared with,
    side by side in one table."""
    from .comparison import markdown_table, resolve_pair
    from .evaluation import check_lm_eval_tasks, eval_rows, eval_steps, evaluate_model
    from .generation import load_for_inference

    try:
        specs = resolve_pair(model, against)
        contexts = _int_list(passkey_contexts, "--passkey-contexts")
        passkey_options = {
            "depths": _float_list(depths, "--depths"),
            "trials": trials,
            "seed": seed,
            "distractors": distractors,
        }
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else []
        lm_eval_options = {"include_path": str(lm_eval_include) if lm_eval_include else None, "limit": lm_eval_limit}
        if tasks:
            with _status("Indexing lm-eval tasks", quiet):
                check_lm_eval_tasks(tasks, lm_eval_options["include_path"])
        if quiet:
            from .sources import hide_progress_bars

            hide_progress_bars()
        total = eval_steps(windows, contexts, len(passkey_options["depths"]), trials, bool(tasks))
        results = {}
        for spec in specs:  # one model in memory at a time
            with _status(f"Loading {spec.label}", quiet):
                loaded, tokenizer = load_for_inference(spec.source, device=device, dtype=dtype.value)
            with _progress(f"Evaluating {spec.label}", total, quiet) as step:
                results[spec.label] = evaluate_model(
                    loaded, tokenizer, text, context, windows, contexts, passkey_options, tasks, lm_eval_options, step
                )
            del loaded
    except LinearizeError as error:
        raise _fail(escape(str(error))) from None
    header, rows = eval_rows(results)
    _print_table("Evaluation", header, rows)
    payload = {
        "models": {spec.label: spec.source or "embedded" for spec in specs},
        "settings": {"text": text, "context": context, "windows": windows, "passkey_contexts": contexts}
        | {k: v for k, v in passkey_options.items()}
        | {"lm_eval": tasks, "lm_eval_limit": lm_eval_limit},
        "results": results,
        "markdown": markdown_table(header, rows),
    }
    _write_outputs(payload, specs, json_path, None if no_record else "linearize_eval.json", quiet)


@app.command(
    epilog="Examples:\n\n"
    "  linearize bench smollm2-liger --against embedded --ctx 512,2048,8192\n\n"
    "  linearize bench ./llama-1b-liger --device cuda --dtype bfloat16 --ctx 1024,4096,16384 --json bench.json",
)
def bench(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    against: Annotated[str | None, typer.Option(help=_AGAINST_HELP, show_default=False)] = None,
    ctx: Annotated[str, typer.Option("--ctx", help="Context lengths to prefill, comma-separated.")] = "512,2048,8192",
    decode_tokens: Annotated[int, typer.Option(help="Single-token decode steps timed per context.", min=1)] = 32,
    repeats: Annotated[int, typer.Option(help="Prefill runs per model and context; the fastest counts.", min=1)] = 3,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).", show_default=False)
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.", show_default=False)
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the PNG plot (default: MODEL/linearize_bench.png for a local folder, else "
            "./linearize_bench.png). Needs matplotlib: pip install 'linearize\\[plot]'.",
            show_default=False,
        ),
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no PNG plot.")] = False,
    no_record: Annotated[bool, typer.Option("--no-record", help=_RECORD_HELP)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="auto: float32 on CPU, the checkpoint's dtype elsewhere.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; the table only.")] = False,
) -> None:
    """Prefill tokens/s, decode ms/token, peak memory and cache bytes at each context, for MODEL and the model it is
    compared with, measured in the same run (ratios MODEL / other)."""
    import torch

    from .benchmark import bench_rows, run_bench
    from .comparison import markdown_table, resolve_pair
    from .generation import load_for_inference

    try:
        specs = resolve_pair(model, against)
        contexts = _int_list(ctx, "--ctx")
        if not contexts:
            raise LinearizeError("--ctx needs at least one context length, e.g. --ctx 512,2048")
        if threads is not None:
            torch.set_num_threads(threads)
        if quiet:
            from .sources import hide_progress_bars

            hide_progress_bars()
        models = {}
        for spec in specs:  # both in memory: their runs alternate
            with _status(f"Loading {spec.label}", quiet):
                models[spec.label], _ = load_for_inference(spec.source, device=device, dtype=dtype.value)
        with _progress("Benchmarking", len(contexts), quiet) as step:
            result = run_bench(models, contexts, decode_tokens, repeats, step)
    except LinearizeError as error:
        raise _fail(escape(str(error))) from None
    header, rows = bench_rows(result)
    _print_table(
        f"Speed and memory on {result['device']}, {result['threads']} threads",
        header,
        rows,
        caption=f"decode: fastest of {decode_tokens} steps; prefill peak: memory growth during the first prefill; "
        f"ratio: {' / '.join(result['models'])}" * (len(specs) == 2),
    )
    result["sources"] = {spec.label: spec.source or "embedded" for spec in specs}
    result["markdown"] = markdown_table(header, rows)
    _write_outputs(result, specs, json_path, None if no_record else "linearize_bench.json", quiet)
    if not no_plot:
        _write_plot(result, plot or _default_plot(specs[0], no_record), quiet)


def _default_plot(spec, no_record: bool) -> Path:
    return (
        spec.folder / "linearize_bench.png"
        if spec.folder is not None and not no_record
        else Path("linearize_bench.png")
    )


def _write_plot(result: dict, path: Path, quiet: bool) -> None:
    from .benchmark import plot_bench

    try:
        plot_bench(result, path)
    except ImportError:
        console.print("[yellow]No plot:[/] it needs matplotlib (pip install 'linearize\\[plot]')", highlight=False)
        return
    if not quiet:
        console.print(f"[green]Wrote[/] {path}", highlight=False)


@app.command(
    epilog="Examples:\n\n"
    "  linearize recipe init --method liger > liger.yaml\n\n"
    "  linearize finetune liger.yaml                          # one process\n\n"
    "  linearize finetune liger.yaml stages.1.epochs=2 training.grad_accum=4\n\n"
    "  torchrun --nproc_per_node 2 -m linearize finetune liger.yaml   # data parallel"
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
        typer.Option("--resume", help="Continue the run in output.dir from its latest checkpoint (same recipe only)."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe and print the plan; load no weights, train nothing.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output (metrics.jsonl is still written).")
    ] = False,
) -> None:
    """Fine-tune a converted model from a recipe: attention transfer and/or LoRA, then save it.

    The run folder (output.dir) gets the resolved recipe, metrics.jsonl, checkpoints/ and, at the end, model/
    (a converted model folder, LoRA merged by default)."""
    from .training.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_file, overrides or [])
        if dry_run:
            Console().print(_finetune_plan(recipe, resume))
            return
        from .training.trainer import finetune as run_finetune

        out = run_finetune(recipe, resume=resume, quiet=quiet, console=console)
        if not quiet:
            console.print(f"[green]Saved[/] {out}")
    except LinearizeError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; checkpoints written so far are kept: rerun with --resume to continue", 130) from None


def _finetune_plan(recipe, resume: bool) -> Table:
    from . import sources
    from .training.checkpoint import list_checkpoints
    from .training.trainer import prepare_run_folder

    conv = recipe.conversion
    source = recipe.model.name or sources.EMBEDDED_NAME
    plan = conv.plan(sources.load_config(recipe.model.name, recipe.model.revision), source)
    run = Path(recipe.output.dir)
    start = prepare_run_folder(run, recipe, resume)
    table = Table(title=f"Fine-tuning plan: {source} -> {conv.method}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for layers, fate in plan.layer_groups():
        table.add_row(f"layers {layers}", fate)
    sources_text = ", ".join(s.label for s in recipe.data.sources)
    table.add_row("data", f"{sources_text}; packs of {recipe.data.seq_len} tokens, held out {recipe.data.held_out}")
    t = recipe.training
    table.add_row("batch", f"{t.micro_batch_size} x {t.grad_accum} accumulation per process")
    for i, stage in enumerate(recipe.stages):
        length = f"{stage.max_steps} steps" if stage.max_steps else f"{stage.epochs:g} epochs"
        table.add_row(
            f"stage {i + 1}",
            f"{stage.kind}: trains {', '.join(stage.trainable)}; {length}; {stage.optimizer.name} "
            f"lr {stage.optimizer.lr:g}, {stage.schedule.kind} schedule"
            + (f"; distils the original (kd_ratio {stage.kd_ratio:g})" if stage.kd_ratio else ""),
        )
    table.add_row("LoRA", f"r {recipe.lora.r}, alpha {recipe.lora.alpha:g} on {', '.join(recipe.lora.target_modules)}")
    table.add_row("output", f"{run}/model" + (" (LoRA merged)" if recipe.output.merge_lora else " + adapter/"))
    if resume:
        table.add_row("resume", str(start) if start else "no checkpoint yet: starts from the beginning")
    elif list_checkpoints(run):
        table.add_row("resume", "checkpoints exist: pass --resume")
    return table


@app.command(
    epilog="Examples:\n\n"
    "  linearize push smollm2-liger my-user/smollm2-135m-liger --dry-run   # files, sizes and the card\n\n"
    "  linearize push runs/liger/model my-org/smollm2-liger --private\n\n"
    "  HF_TOKEN=hf_... linearize push smollm2-liger my-user/smollm2-liger --revision v2 --quiet"
)
def push(
    folder: Annotated[Path, typer.Argument(help="A converted (or fine-tuned) model folder; it is not modified.")],
    repo_id: Annotated[
        str, typer.Argument(metavar="ORG/NAME", help="The Hub repo: your user name or an organization, then a name.")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(help="Branch to commit to, created if missing (default: the main branch).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the files, their sizes and the model card; load nothing, send nothing."),
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
    from .publish import plan_push
    from .publish import push as push_folder

    try:
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
            on_step=None if quiet else lambda text: console.print(text, highlight=False),
        )
    except LinearizeError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted before the Hub confirmed the commit: the push is not done", 130) from None
    if quiet:
        print(url)
    else:
        console.print(f"[green]Pushed[/] {url}", highlight=False)


def _print_push_plan(plan, endpoint: str | None) -> None:
    from huggingface_hub import constants

    out = Console()
    target = f"{endpoint or constants.ENDPOINT}/{plan.repo_id}"
    where = f"branch {plan.revision}" if plan.revision else "the main branch"
    table = Table(title=f"Push plan: {plan.folder} -> {target} ({where}{', private' if plan.private else ''})")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in plan.files:
        table.add_row(path, _size(size))
    table.add_row(f"{len(plan.files)} files, one commit", _size(plan.total_bytes), style="bold")
    out.print(table)
    out.rule("README.md (generated model card)")
    print(plan.card)  # plain print: the card's [links] must not be read as rich markup


recipe_app = typer.Typer(help="Create and check fine-tuning recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("init")
def recipe_init(
    method: Annotated[Method, typer.Option("--method", "-m", help=_METHOD_HELP)] = "liger",
) -> None:
    """Print a commented starting recipe for METHOD (redirect it to a file)."""
    from .training.recipe import recipe_template

    try:
        print(recipe_template(method.value), end="")
    except LinearizeError as error:
        raise _fail(str(error)) from None


@recipe_app.command("validate")
def recipe_validate(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE.yaml", help="The recipe to check.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Overrides, as for finetune.", show_default=False),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="Also print the resolved recipe, defaults filled in.")] = False,
) -> None:
    """Check RECIPE.yaml without loading anything: syntax, keys, types and value ranges."""
    from .training.recipe import load_recipe, resolved_yaml

    try:
        recipe = load_recipe(recipe_file, overrides or [])
    except LinearizeError as error:
        raise _fail(str(error)) from None
    if show:
        print(resolved_yaml(recipe), end="")
    console.print(f"[green]OK[/] {recipe_file}: {len(recipe.stages)} stage(s), method {recipe.conversion.method}")


@app.command()
def version() -> None:
    """Print the versions of linearize and the libraries it runs on."""
    import torch
    import transformers

    print(
        f"linearize {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {sys.version.split()[0]}; families: {', '.join(FAMILIES)}"
    )
