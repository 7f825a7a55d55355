"""`linearize eval` and `linearize bench`: a model next to the one it came from, quality and speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import LinearizeError
from .common import (
    AGAINST_HELP,
    JSON_HELP,
    MODEL_HELP,
    RECORD_HELP,
    STDOUT,
    Dtype,
    app,
    check_output_file,
    console,
    exits_on_error,
    float_list,
    hide_library_bars,
    int_list,
    print_table,
    progress_bar,
    spinner,
    write_outputs,
)

OPTIONAL_MODEL_HELP = f"{MODEL_HELP} Omit it for the embedded SmolLM2."


@app.command(
    "eval",
    epilog="Examples:\n\n"
    "  linearize eval smollm2-liger --against embedded\n\n"
    "  linearize eval smollm2-liger --text 'data/*.txt' --context 1024 --passkey-contexts 512,2048\n\n"
    "  linearize eval smollm2-liger --text hf:wikitext:wikitext-2-raw-v1:test --json eval.json\n\n"
    "  linearize eval smollm2-liger --lm-eval hellaswag,arc_easy --lm-eval-limit 200",
)
@exits_on_error(
    interrupted="interrupted; the results are written (--json, the record) only once every model is measured"
)
def eval_command(
    model: Annotated[str | None, typer.Argument(help=OPTIONAL_MODEL_HELP, show_default=False)] = None,
    against: Annotated[str | None, typer.Option(help=AGAINST_HELP, show_default=False)] = None,
    text: Annotated[
        str,
        typer.Option(
            help="Perplexity text: 'builtin' (general English shipped with linearize, never trained on by "
            "'builtin: english' recipes; offline), a local file or glob (.txt/.md/.jsonl/.json/.parquet), or "
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
    distractors: Annotated[int, typer.Option(help="Wrong keys the true key is ranked against.", min=1, max=1000)] = 9,
    seed: Annotated[int, typer.Option(help="Chooses the passkeys and distractors.")] = 0,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Comma-separated lm-evaluation-harness tasks, run through its HF model class "
            "(needs lm-evaluation-harness: `pip install lm_eval`).",
            show_default=False,
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None,
        typer.Option(
            help="A folder of extra lm-eval task YAML files (the repository's recipes/lm-eval runs ARC-Easy and "
            "HellaSwag offline from local JSONL files).",
            show_default=False,
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None,
        typer.Option(help="At most this many documents per lm-eval task.", min=1, show_default=False),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help=JSON_HELP, show_default=False)] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help=RECORD_HELP)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="auto: float32 on CPU, the checkpoint's dtype elsewhere.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; the table only.")] = False,
) -> None:
    """Perplexity, passkey retrieval and (optionally) lm-eval tasks for MODEL (default: the embedded SmolLM2) and the
    model it is compared with, side by side in one table."""
    import torch

    from ..comparison import markdown_table
    from ..evaluation import check_lm_eval_tasks, eval_rows, eval_steps, evaluate_model, same_vocabulary, text_windows
    from ..generation import load_for_inference
    from ..passkey import check_contexts
    from ..sources import load_tokenizer, pick_device

    check_output_file(json_path, "--json", "results.json", stdout=True)
    device = pick_device(device)  # before any model loads or lm-eval indexes its tasks
    contexts = int_list(passkey_contexts, "--passkey-contexts")
    specs = _checked_pair(model, against, {"--context": [context], "--passkey-contexts": contexts})
    passkey_options = {
        "depths": _depths(depths),
        "trials": trials,
        "seed": seed,
        "distractors": distractors,
    }
    tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else []
    if not tasks and (lm_eval_limit is not None or lm_eval_include is not None):
        raise LinearizeError("--lm-eval-limit and --lm-eval-include apply to --lm-eval tasks; add --lm-eval TASKS")
    lm_eval_options = {"include_path": str(lm_eval_include) if lm_eval_include else None, "limit": lm_eval_limit}
    tokenizers = [load_tokenizer(spec.source) for spec in specs]  # what is wrong before any model loads
    for tokenizer in tokenizers:
        check_contexts(tokenizer, contexts)
    # a text that is missing or shorter than one window is named before any model loads, not after the first's
    text_ids = [text_windows(text, tokenizer, context, windows) for tokenizer in tokenizers]
    same_tokens = same_vocabulary(tokenizers)
    if not same_tokens:
        console.print(
            f"[yellow]Warning:[/] {escape(' and '.join(spec.label for spec in specs))} have different tokenizers: each "
            "perplexity is per token of the model's own tokenization of the text, so the two do not compare (passkey "
            "and lm-eval scores do)",
            highlight=False,
            soft_wrap=True,
        )
    if tasks:
        with spinner("Indexing lm-eval tasks", quiet):
            check_lm_eval_tasks(tasks, lm_eval_options["include_path"])
    hide_library_bars(quiet)
    total = eval_steps(windows, contexts, len(passkey_options["depths"]), trials, bool(tasks))
    results, stopped, loaded_in = {}, None, None
    for spec, tokenizer, ids in zip(specs, tokenizers, text_ids, strict=True):  # one model in memory at a time
        in_use = None if dtype.value == "auto" else dtype.value  # known once the model has loaded
        try:
            with spinner(f"Loading {spec.label}", quiet):
                loaded, _ = load_for_inference(spec.source, device=device, dtype=dtype.value, needs_tokenizer=False)
            in_use = str(loaded.dtype).removeprefix("torch.")
            loaded_in = loaded_in or in_use  # what --dtype auto came to
            with progress_bar(f"Evaluating {spec.label}", total, quiet) as step:
                options = (text, context, windows, contexts, passkey_options, tasks, lm_eval_options, step, ids)
                results[spec.label] = evaluate_model(loaded, tokenizer, *options)
        except torch.OutOfMemoryError:  # the original's KV cache at a long passkey context, most often
            stopped = f"out of memory while evaluating {spec.label} on {device}"
            break
        finally:
            loaded = None  # before the next model loads
    if stopped is not None and not results:
        raise LinearizeError(f"{stopped}: {_out_of_memory_fix(in_use)}")
    header, rows = eval_rows(results, same_tokens)
    print_table("Evaluation", header, rows, stderr=json_path == STDOUT)
    payload = {
        "models": {spec.label: spec.source or "embedded" for spec in specs if spec.label in results},
        "settings": {"text": text, "context": context, "windows": windows, "passkey_contexts": contexts}
        | {"device": device, "dtype": loaded_in}
        | passkey_options
        | {"lm_eval": tasks, "lm_eval_limit": lm_eval_limit},
        "results": results,
        "markdown": markdown_table(header, rows),
    }
    write_outputs(payload, specs, json_path, None if no_record else "linearize_eval.json", quiet)
    if stopped is not None:  # what was measured before it is shown and written, not lost with it
        raise LinearizeError(
            f"{stopped}; the results of {', '.join(results)} are shown above (and written as asked): "
            f"{_out_of_memory_fix(in_use)}"
        )


def _out_of_memory_fix(in_use: str | None) -> str:
    """What lets eval fit, for a model that ran out of memory in `in_use` (None: not known, the load itself failed
    under --dtype auto): bfloat16 halves float32's memory, and changes nothing for a 16-bit dtype."""
    smaller = "" if in_use in ("bfloat16", "float16") else ", or --dtype bfloat16"
    return f"measure shorter --context and --passkey-contexts{smaller}"


@app.command(
    epilog="Examples:\n\n"
    "  linearize bench smollm2-liger --against embedded --ctx 512,2048,8192\n\n"
    "  linearize bench ./llama-1b-liger --device cuda --dtype bfloat16 --ctx 1024,4096,16384 --json bench.json",
)
@exits_on_error(
    interrupted="interrupted; the results are written (--json, the record, the plot) only once every model is measured"
)
def bench(
    model: Annotated[str | None, typer.Argument(help=OPTIONAL_MODEL_HELP, show_default=False)] = None,
    against: Annotated[str | None, typer.Option(help=AGAINST_HELP, show_default=False)] = None,
    ctx: Annotated[str, typer.Option("--ctx", help="Context lengths to prefill, comma-separated.")] = "512,2048,8192",
    decode_tokens: Annotated[
        int, typer.Option(help="Single-token decode steps in each decode run, from its round's prefill.", min=1)
    ] = 32,
    repeats: Annotated[
        int,
        typer.Option(
            help="Prefill runs and decode runs per model and context, alternating between the models; the median "
            "counts.",
            min=1,
        ),
    ] = 3,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).", min=1, show_default=False)
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help=JSON_HELP, show_default=False)] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the PNG plot (default: MODEL/linearize_bench.png for a local folder, else "
            "./linearize_bench.png; with --no-record, none unless given). Needs matplotlib: pip install matplotlib.",
            show_default=False,
        ),
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no PNG plot.")] = False,
    no_record: Annotated[
        bool, typer.Option("--no-record", help=RECORD_HELP + " Nor the plot, unless --plot names a file.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="auto: float32 on CPU, the checkpoint's dtype elsewhere.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; the table only.")] = False,
) -> None:
    """Prefill tokens/s, decode ms/token, peak memory and cache bytes at each context, for MODEL (default: the
    embedded SmolLM2) and the model it is compared with, measured in the same run (ratios MODEL / other)."""
    import torch

    from ..benchmark import BenchStopped, bench_rows, run_bench
    from ..comparison import counted, markdown_table
    from ..generation import load_for_inference
    from ..sources import pick_device

    check_output_file(json_path, "--json", "results.json", stdout=True)
    if plot is not None and no_plot:
        raise LinearizeError(f"--plot {plot} asks for a plot and --no-plot for none; pass one of them")
    if plot is not None and plot.suffix.lower() not in ("", ".png"):
        raise LinearizeError(f"--plot {plot}: the plot is a PNG; give a path ending in .png (or none)")
    check_output_file(plot, "--plot", "bench.png")
    device = pick_device(device)  # before any model loads
    contexts = int_list(ctx, "--ctx")
    if not contexts:
        raise LinearizeError("--ctx needs at least one context length, e.g. --ctx 512,2048")
    specs = _checked_pair(model, against, {"--ctx": contexts})
    if threads is not None:
        torch.set_num_threads(threads)
    hide_library_bars(quiet)
    models = {}
    for spec in specs:  # both in memory: their runs alternate
        with spinner(f"Loading {spec.label}", quiet):
            models[spec.label], _ = load_for_inference(
                spec.source, device=device, dtype=dtype.value, needs_tokenizer=False
            )
    stopped = None
    with progress_bar("Benchmarking", len(contexts), quiet) as step:
        try:
            result = run_bench(models, contexts, decode_tokens, repeats, step)
        except BenchStopped as error:
            if error.result is None:
                raise
            result, stopped = error.result, error  # the contexts before it are shown and written, then it fails
    header, rows = bench_rows(result)
    print_table(
        f"Speed and memory on {result['device']}, {counted(result['threads'], 'thread')}",
        header,
        rows,
        caption=f"prefill: median of {counted(repeats, 'run')}; decode: median of {counted(repeats, 'run')} of "
        f"{counted(decode_tokens, 'step')} "
        "(each run's median step); "
        "prefill peak: the most memory the prefill's tensors held at once"
        + f"; ratio: {' / '.join(result['models'])} (in brackets: the lowest and highest of the runs' ratios)"
        * (len(specs) == 2),
        stderr=json_path == STDOUT,
    )
    result["sources"] = {spec.label: spec.source or "embedded" for spec in specs}
    result["markdown"] = markdown_table(header, rows)
    write_outputs(result, specs, json_path, None if no_record else "linearize_bench.json", quiet)
    if not no_plot and (plot is not None or not no_record):
        _write_plot(result, plot or _default_plot(specs[0]), quiet)
    if stopped is not None:
        raise LinearizeError(f"{stopped}; the contexts before it are shown above (and written as asked)")


def _depths(value: str) -> tuple[float, ...]:
    """--depths, checked before any model loads (the passkey task runs after the perplexity has been measured)."""
    depths = float_list(value, "--depths")
    if not all(0 <= depth <= 1 for depth in depths):
        raise LinearizeError(f"--depths takes fractions between 0 and 1 (0: the key first, 1: last); got {value!r}")
    return depths


def _checked_pair(model: str | None, against: str | None, lengths: dict[str, list[int]]) -> list:
    """`comparison.resolve_pair` of MODEL and --against, each checked to load (its config, before any weights):
    a bad --against is named before MODEL has been measured, not after. `lengths` ({option: token counts}) beyond
    a model's positions get one warning: measuring there is how length generalisation shows, not an error."""
    from .. import sources
    from ..comparison import resolve_pair

    specs = resolve_pair(_checked_model(model), against)
    configs = {spec.label: sources.load_config(spec.source) for spec in specs}
    positions = {label: getattr(config, "max_position_embeddings", None) for label, config in configs.items()}
    most = min((n for n in positions.values() if n), default=None)
    beyond = {option: [n for n in counts if most and n > most] for option, counts in lengths.items()}
    if any(beyond.values()):
        named = ", ".join(f"{option} {','.join(map(str, counts))}" for option, counts in beyond.items() if counts)
        console.print(
            f"[yellow]Warning:[/] {named} is beyond the {most} positions (max_position_embeddings) of "
            f"{escape(' and '.join(label for label, n in positions.items() if n == most))}: measured all the same",
            highlight=False,
            soft_wrap=True,
        )
    return specs


def _checked_model(model: str | None) -> str:
    """MODEL, or "embedded" when omitted; a local folder's files are checked first, since `resolve_pair` reads its
    config.json and a damaged one must be named as such."""
    from ..comparison import EMBEDDED
    from ..sources import resolve

    if model is None or model == EMBEDDED:
        return EMBEDDED
    resolve(model)
    return model


def _default_plot(spec) -> Path:
    return spec.folder / "linearize_bench.png" if spec.folder is not None else Path("linearize_bench.png")


def _write_plot(result: dict, path: Path, quiet: bool) -> None:
    from ..benchmark import plot_bench

    path = path if path.suffix else path.with_suffix(".png")  # as matplotlib names it
    try:
        plot_bench(result, path)
    except ImportError:
        console.print(
            "[yellow]No plot:[/] it needs matplotlib (pip install matplotlib)", highlight=False, soft_wrap=True
        )
        return
    except OSError as error:
        console.print(
            f"[yellow]No plot:[/] cannot write {escape(str(path))} ({error.strerror}); pass --plot PATH",
            highlight=False,
            soft_wrap=True,
        )
        return
    if not quiet:
        console.print(f"[green]Wrote[/] {escape(str(path))}", highlight=False, soft_wrap=True)
