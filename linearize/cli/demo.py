"""`linearize demo`: the product on the embedded model, offline, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import app, console, exits_on_error, hide_library_bars, human_size, print_table


@app.command(
    epilog="Example:\n\n  linearize demo -o demo-out --force     # what `make demo` runs",
)
@exits_on_error(interrupted="interrupted")
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the fine-tuned model and its run.")] = Path(
        "demo-out"
    ),
    steps: Annotated[int, typer.Option(help="LoRA steps of the Liger fine-tune (512 tokens each).", min=1)] = 30,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress; the table and answers only.")] = False,
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct three ways and compare with the original: swa (training-free),
    Parallax (exact at conversion) and Liger through a short fine-tune whose held-out perplexity falls as it runs;
    then a table of perplexity, cache at 8K tokens and decode speed, and the models' answers to one question.
    Offline; 3 to 6 minutes on 2 CPU cores."""
    from ..demo import CACHE_CONTEXT, DECODE_CONTEXT, QUESTION, run_demo

    def say(message: str) -> None:
        if not quiet:
            console.print(f"[bold]{message}[/]", highlight=False, soft_wrap=True)

    hide_library_bars(quiet)
    result = run_demo(output, steps, force=force, say=say, quiet=quiet, console=console)
    header = [
        "model",
        "perplexity",
        f"cache at {CACHE_CONTEXT // 1024}K tokens",
        f"decode ms/token at {DECODE_CONTEXT} tokens",
    ]
    rows = [
        [
            row.label,
            f"{row.perplexity:.2f}",
            human_size(row.cache_bytes) + (" (grows)" if row.cache_grows else " (constant)"),
            "" if row.decode_ms is None else f"{row.decode_ms:.1f}",
        ]
        for row in result.rows
    ]
    print_table(
        "The embedded SmolLM2-135M-Instruct and its conversions",
        header,
        rows,
        caption="perplexity: the built-in corpus's test split, never trained on; fp32 on this machine",
    )
    for label, answer in result.answers.items():
        print(f"{label}: {QUESTION} -> {answer.strip()!r}")
    print(f"The fine-tuned model: {result.model_folder} (load it with transformers after `import linearize`).")
