"""`linearize convert` and `linearize generate`: make a converted model folder, and sample from one."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LinearizeError
from ..families import CONVERT_LAYERS, get_family
from ..methods import all_parameters, describe_parameter
from ..selection import CALIBRATION_WINDOWS, DEFAULT_SCORER, SCORERS
from .common import (
    METHOD_HELP,
    Dtype,
    Method,
    app,
    console,
    exits_on_error,
    hide_library_bars,
    human_size,
    progress_bar,
    stdout_console,
)

Scorer = Enum("Scorer", {name: name for name in SCORERS}, type=str)
LayerScope = Enum("LayerScope", {name: name for name in CONVERT_LAYERS}, type=str)
SCORER_HELP = "With --softmax-layers auto:K, how a layer is scored: " + "; ".join(
    f"{name}: {text}" for name, text in SCORERS.items()
)
BAR_WIDTH = 30


def _plan_table(plan) -> Table:
    from ..convert import PLAN_CONTEXT

    table = Table(title=f"Conversion plan: {escape(plan.source)} -> {plan.settings['method']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    family = get_family(plan.config.base_model_type)
    specifics = family.specifics(plan.config)
    table.add_row("family", family.model_type + (f" ({'; '.join(specifics)})" if specifics else ""))
    table.add_row("method", plan.method_text())
    for layers, fate in plan.layer_groups():
        table.add_row(f"layers {layers}", fate)
    if plan.unconverted_sliding:  # not a sliding-window layer kept by --softmax-layers
        table.add_row(
            "sliding-window layers",
            "kept as they are: their cache is already constant-size (--convert-layers all converts them)",
        )
    added = plan.converted_parameters - plan.source_parameters
    table.add_row("parameters", f"{plan.source_parameters:,} (+{added:,} added)")
    ctx = PLAN_CONTEXT
    table.add_row(
        f"cache / sequence at {ctx} tokens",
        f"{human_size(plan.converted_cache_bytes(ctx))} (original KV cache: {human_size(plan.kv_cache_bytes(ctx))})",
    )
    table.add_row("cache grows with context", _cache_growth(plan))
    return table


def _selection_table(selection) -> Table:
    """Every layer's score, as a number and a bar, the kept ones marked."""
    kept = set(selection.layers)
    table = Table(
        title=f"Layer scores ({selection.scorer}: {SCORERS[selection.scorer].split(' (')[0]}; "
        f"{escape(selection.calibration)})",  # a --calibration path or glob may hold [brackets]
        caption=f"kept as softmax attention ({selection.rule}): " + (", ".join(map(str, selection.layers)) or "none"),
    )
    for column in ("layer", "score", "", "kept"):
        table.add_column(column, justify="right" if column in ("layer", "score") else "left")
    top = max(max(selection.scores), 1e-12)
    for layer, score in enumerate(selection.scores):
        bar = "█" * round(BAR_WIDTH * max(score, 0.0) / top)
        table.add_row(str(layer), f"{score:.4g}", bar, "softmax" if layer in kept else "")
    return table


def _cache_growth(plan) -> str:
    from ..convert import PLAN_CONTEXT
    from ..methods import get_method

    def growth(layers: list[int]) -> int:
        return plan.kv_cache_bytes(2 * PLAN_CONTEXT, layers) - plan.kv_cache_bytes(PLAN_CONTEXT, layers)

    kept = plan.config.linearize["softmax_layers"]
    converted_growth = plan.converted_cache_bytes(2 * PLAN_CONTEXT) - plan.converted_cache_bytes(PLAN_CONTEXT)
    converted_growth -= growth(kept)
    softmax = sum(growth([i]) > 0 for i in kept)  # sliding-window layers keep a constant-size cache
    parts = []
    if converted_growth:
        per_1k = converted_growth / (PLAN_CONTEXT / 1024)
        reason = get_method(plan.settings["method"]).cache_growth
        parts.append(f"in the converted layers by {human_size(per_1k)} per 1K tokens ({reason})")
    if softmax:
        parts.append(f"in the {softmax} softmax layers")
    return "yes: " + "; ".join(parts) if parts else "no"


def takes_method_options(command: Callable) -> Callable:
    """Give `command`, which takes `**method_options`, one option per parameter any method declares (see
    `linearize.methods`), before its `--softmax-layers`: each option's type and help come from the declarations."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    derived = []
    for name, takers in all_parameters().items():
        first = takers[0][1]
        option = typer.Option(first.flag, help=describe_parameter(takers) + ".", show_default=False)
        derived.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[first.type | None, option]
            )
        )
    at = [p.name for p in params].index("softmax_layers")
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[at:]]
    command.__signature__ = signature.replace(parameters=params[:at] + derived + keyword)
    return command


@app.command(
    epilog="Examples:\n\n"
    "  linearize convert -o smollm2-liger                  # the embedded SmolLM2-135M, Liger\n\n"
    "  linearize convert Qwen/Qwen3-0.6B -m swa -o q3-swa  # training-free baseline\n\n"
    "  linearize convert ./my-llama --softmax-layers every:8 --dry-run"
)
@exits_on_error(interrupted="interrupted; no output folder was written")
@takes_method_options
def convert(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Source model: a Hugging Face Hub id (org/name) or a local folder. Omit it (or say 'embedded') to "
            "convert the embedded default, SmolLM2-135M-Instruct, which works offline.",
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
    softmax_layers: Annotated[
        str | None,
        typer.Option(
            help="Layers kept as the original softmax attention: '0,8,16', 'every:8' (layers 0, 8, 16, ...) or "
            "'auto:K': score every layer on calibration text by how much converting it alone hurts, and keep the K "
            "worst (loads the weights, also with --dry-run).",
            show_default=False,
        ),
    ] = None,
    convert_layers: Annotated[
        LayerScope | None,
        typer.Option(
            help="Which layers a model with sliding-window layers interleaved among global ones (Gemma 2/3) "
            "converts: global (their default: the sliding-window layers already keep a constant-size cache and "
            "stay as they are) or all. Every other family converts all.",
            show_default=False,
        ),
    ] = None,
    layer_scorer: Annotated[
        Scorer | None, typer.Option(help=SCORER_HELP + f" (default: {DEFAULT_SCORER}).", show_default=False)
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="With auto:K, the text layers are scored on, as `linearize eval --text` takes it: a file or glob, "
            "hf:NAME[:CONFIG][:SPLIT], or builtin (default: the built-in English corpus's training split).",
            show_default=False,
        ),
    ] = None,
    calibration_windows: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"With auto:K, the 512-token windows of calibration text scored (default: {CALIBRATION_WINDOWS}).",
            show_default=False,
        ),
    ] = None,
    spread_layers: Annotated[
        bool,
        typer.Option(
            "--spread-layers",
            help="With auto:K, keep the highest-scoring layer of each of K equal stretches of the depth (spread "
            "like every:N) instead of the K highest-scoring layers, which may bunch together.",
        ),
    ] = False,
    spread_over: Annotated[
        int | None,
        typer.Option(
            "--spread-over",
            min=1,
            help="With auto:K, keep the highest-scoring layer of each of S equal stretches of the depth (1 to K), "
            "then the K - S highest-scoring others: spread and peaks together (--spread-layers is S = K).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[Dtype, typer.Option(help="Dtype of the saved weights; auto keeps the source's.")] = "auto",
    device: Annotated[str, typer.Option(help="Device for loading and --verify: auto, cpu, cuda, cuda:1, ...")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No spinners, progress bars or plan table; warnings, --verify's table and the result."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (layers, parameters, cache size) "
            "from the source config alone; load no weights (but to score auto:K), write nothing.",
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
            "without tokenizer files); one with more tokens than the model embeds, or under 90% as many (another "
            "model's), is refused.",
            show_default=False,
        ),
    ] = None,
    **method_options,  # one option per method parameter, declared in linearize.methods (see takes_method_options)
) -> None:
    """Convert MODEL's attention layers to a linear or hybrid method and save a loadable model folder."""
    from ..comparison import EMBEDDED
    from ..convert import convert_and_save

    model = None if model == EMBEDDED else model  # the name `eval` and `bench` take for it
    if output is None and not dry_run:
        raise LinearizeError("pass an output folder with -o/--output (or use --dry-run)")
    if spread_layers and spread_over:
        raise LinearizeError("--spread-layers is --spread-over K; give one of them")
    hide_library_bars(quiet)
    report = _ConsoleReport(model, quiet=quiet, plan_is_result=dry_run)
    try:
        conversion = convert_and_save(
            model,
            None if dry_run else output,
            method.value,
            softmax_layers=softmax_layers,
            convert_layers=convert_layers.value if convert_layers else None,
            layer_scorer=layer_scorer.value if layer_scorer else None,
            calibration=calibration,
            calibration_windows=calibration_windows,
            spread_layers=spread_over or spread_layers,  # both given: refused above
            dtype=dtype.value,
            device=device,
            force=force,
            tokenizer=tokenizer_source,
            verify=verify,
            push_to_hub=push_to_hub,
            private=private,
            report=report,
            **method_options,
        )
    finally:
        report.stop_spinner()
    if conversion.url:
        console.print(f"[green]Pushed[/] {conversion.url}", highlight=False, soft_wrap=True)


class _ConsoleReport:
    """`convert_and_save`'s report on the terminal: each step as a spinner on stderr until the next report, the
    plan and the comparison as tables. It has `linearize.convert.ConvertReport`'s methods without subclassing it:
    that module imports torch, which the CLI loads only inside commands."""

    def __init__(self, model: str | None, quiet: bool = False, plan_is_result: bool = False):
        self._model = model
        self._quiet = quiet
        # a dry run's plan is what it prints (`> plan.txt`), --quiet too; a conversion's is a note on its way, with
        # the spinners
        self._plan_is_result = plan_is_result
        self._plan_console = stdout_console() if plan_is_result else console
        self._spinner = None
        self._bar = ExitStack()

    def step(self, text: str) -> None:
        self.stop_spinner()
        if not self._quiet:
            self._spinner = console.status(escape(text))  # "Loading MODEL": a path may hold [brackets]
            self._spinner.start()

    def stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None
        self._bar.close()

    def scoring(self, total: int) -> Callable[[], None]:
        self.stop_spinner()
        advance = self._bar.enter_context(progress_bar("Scoring layers", total, quiet=self._quiet))
        return advance or (lambda: None)

    def planned(self, plan) -> None:
        self.stop_spinner()
        if self._quiet and not self._plan_is_result:
            return
        if plan.selection is not None:
            self._plan_console.print(_selection_table(plan.selection))
        self._plan_console.print(_plan_table(plan))

    def saved(self, conversion) -> None:
        from ..convert import PASS_TOKENIZER

        self.stop_spinner()
        output, model = escape(str(conversion.output)), escape(str(self._model))  # paths may hold [brackets]
        console.print(
            f"[green]Saved[/] {output}. Load it with `import linearize` then "
            f"AutoModelForCausalLM.from_pretrained('{output}'), or with trust_remote_code=True.",
            soft_wrap=True,
        )
        if not conversion.tokenizer_saved:
            console.print(
                f"[yellow]Warning:[/] '{model}' has no tokenizer, so neither has {output}; `generate` and "
                f"`eval` need one. Convert again and {PASS_TOKENIZER}, or copy the same model's tokenizer files "
                "into it.",
                highlight=False,
                soft_wrap=True,
            )

    def compared(self, rows: list[dict]) -> None:
        self.stop_spinner()
        table = Table(title="Original vs converted (built-in text, 4 x 512 tokens; greedy sample)")
        for column in ("model", "perplexity", "sample"):
            table.add_column(column)
        for row in rows:
            sample = row["sample"].strip().replace("\n", " ")  # a model's text may hold [brackets] ([/INST])
            table.add_row(escape(row["model"]), f"{row['perplexity']:.2f}", escape(sample))
        stdout_console().print(table)

    def pushing(self, text: str) -> None:
        console.print(escape(text), highlight=False, soft_wrap=True)


@app.command()
@exits_on_error(also=(ValueError,))
def generate(
    model: Annotated[
        str,
        typer.Argument(help="A converted model folder, any causal LM folder or hub id, or 'embedded' (SmolLM2)."),
    ],
    prompt: Annotated[
        str,
        typer.Argument(
            help="The prompt ('-': standard input); wrapped in the chat template when the tokenizer has one."
        ),
    ],
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
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=2**64 - 1,
            help="Seed the sampling (with a temperature above 0): the same seed gives the same text.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[
        Dtype,
        typer.Option(
            help="auto: float32 on CPU (faster there, twice a bfloat16 folder's memory), the checkpoint's dtype "
            "elsewhere."
        ),
    ] = "auto",
) -> None:
    """Stream a completion of PROMPT from MODEL, decoding with the model's constant-size cache."""
    from ..comparison import EMBEDDED
    from ..generation import ReplyStreamer, chat_used, load_for_inference
    from ..generation import generate as generate_text

    prompt = _read_prompt(prompt)
    with console.status(f"Loading {escape(model)}"):
        loaded, tokenizer = load_for_inference(None if model == EMBEDDED else model, device=device, dtype=dtype.value)
    streamer = ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    text = generate_text(loaded, tokenizer, prompt, max_new_tokens, chat, temperature, streamer=streamer, seed=seed)
    # only the hints that apply: fine-tuning for a converted model, --no-chat where the chat template was used
    converted = loaded.config.model_type == "linearize"
    weak = ["a converted model is weak until fine-tuned: see `linearize finetune`"] if converted else []
    plain = ["--no-chat continues the prompt as plain text"] if chat_used(tokenizer, chat) else []
    eos = loaded.generation_config.eos_token_id
    ended = not streamer.ids or streamer.ids[0] in (eos if isinstance(eos, list) else [eos])
    if not text and not ended:  # special tokens alone (not the end of turn) up to --max-new-tokens: shown by name
        shown = tokenizer.decode(streamer.ids[:8]) + ("..." if len(streamer.ids) > 8 else "")
        console.print(
            f"[yellow]Nothing printed:[/] the reply was {len(streamer.ids)} special tokens ({escape(repr(shown))})"
            + _hints(weak),
            highlight=False,
            soft_wrap=True,
        )
    elif not text:  # an end-of-turn first: say so rather than print nothing
        console.print(
            f"[yellow]Nothing generated:[/] the model ended its reply at once{_hints(weak + plain)}",
            highlight=False,
            soft_wrap=True,
        )
    elif not text.strip():  # spaces or newlines streamed, which look like nothing
        console.print(f"[yellow]Only whitespace generated[/]{_hints(weak)}", highlight=False, soft_wrap=True)


def _read_prompt(prompt: str) -> str:
    """PROMPT, or standard input for "-" without its trailing newlines (as the shell's `$(...)` drops them)."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig").rstrip("\n")  # -sig: a byte-order mark is not text
    except UnicodeDecodeError as error:
        raise LinearizeError(
            f"standard input is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "convert it (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _hints(hints: list[str]) -> str:
    return f" ({'; '.join(hints)})" if hints else ""
