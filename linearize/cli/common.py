"""Shared pieces of the command line: the Typer app, the stderr console, error exits, progress and table output."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import LinearizeError
from ..methods import METHODS

app = typer.Typer(
    help="Convert pretrained Hugging Face LLMs from softmax attention to linear or hybrid attention.\n\n"
    "Note: 'Liger' here is the linearization method (Lan et al., 2025), unrelated to LinkedIn's Liger-Kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# messages print with soft_wrap=True: a long path stays on one line, to copy or grep (a terminal wraps it for the eye);
# emoji=False: ':x:' in a path or an hf:NAME:CONFIG:SPLIT spec is text, which rich printed as an emoji
console = Console(stderr=True, emoji=False)
Method = Enum("Method", {name.replace("-", "_"): name for name in METHODS}, type=str)
Dtype = Enum("Dtype", {name: name for name in ("auto", "float32", "bfloat16", "float16")}, type=str)
METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def stdout_console() -> Console:
    """A console on stdout (a result, a table) that prints text as it is, as `console` does (no emoji codes)."""
    return Console(emoji=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print the error (as plain text: messages quote YAML such as `[lora, new]`) and return the exit to raise."""
    console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def exits_on_error(interrupted: str | None = None, also: tuple[type[Exception], ...] = ()) -> Callable:
    """Decorate a command (under `@app.command`) so that a LinearizeError, or one of `also`, is printed by `fail`
    and exits 1 instead of a traceback.

    With `interrupted`, Ctrl-C exits 130 with that message: what the command leaves behind when stopped. A
    KeyboardInterrupt that carries a message of its own is printed as that message instead: the library function
    that re-raised it knew better what was left undone. SIGTERM (`timeout`, a CI cancel, `docker stop`, a scheduler)
    stops such a command as Ctrl-C does, cleaning up alike, and exits 143."""
    caught = (LinearizeError, *also)

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)  # Typer reads the options from the signature that `wraps` passes on
        def run(*args, **kwargs):
            terminated = []
            try:
                with _sigterm_interrupts(terminated, enabled=interrupted is not None):
                    return command(*args, **kwargs)
            except (*caught, *_kernel_errors()) as error:
                raise fail(str(error)) from None
            except KeyboardInterrupt as interrupt:
                if interrupted is None:
                    raise
                if terminated:
                    raise fail(f"terminated (SIGTERM): {str(interrupt) or interrupted}", 143) from None
                raise fail(str(interrupt) or interrupted, 130) from None

        return run

    return decorate


@contextmanager
def _sigterm_interrupts(terminated: list, enabled: bool) -> Iterator[None]:
    """While the body runs, SIGTERM raises KeyboardInterrupt where the command is (and is noted in `terminated`),
    so that its staging folders are removed as on Ctrl-C rather than left behind as a kill leaves them. Only in the
    main thread, where Python runs signal handlers (a library caller may run a command elsewhere)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kernel_errors() -> tuple[type[Exception], ...]:
    """The kernels' errors that are the user's to fix (a backend that cannot run), if the kernels were imported,
    which one raised implies: importing them here would import torch, which `--help` must not."""
    backend = sys.modules.get("linearize.kernels.backend")
    return (backend.BackendError,) if backend is not None else ()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def hide_library_bars(quiet: bool) -> None:
    """Under --quiet, transformers' own bars (loading and saving weights) are hidden too."""
    if quiet:
        from ..sources import hide_progress_bars

        hide_progress_bars()


@contextmanager
def progress_bar(description: str, total: int, quiet: bool):
    """A progress bar on stderr when it is a terminal and not --quiet; yields the callback that advances it (or
    None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet or not console.is_terminal:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(escape(description), total=total)
        yield lambda: bar.advance(task)


@contextmanager
def spinner(message: str, quiet: bool):
    if quiet:
        yield
    else:
        with console.status(escape(message)):  # a model's name or path may hold [brackets]
            yield


def int_list(value: str, option: str) -> list[int]:
    """'256,1024' -> [256, 1024]; 'none' or '' -> []."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise LinearizeError(f"{option} takes comma-separated token counts, e.g. 512,2048; got {value!r}") from None
    if any(n < 2 for n in numbers):
        raise LinearizeError(f"{option}: every length must be at least 2 tokens; got {value!r}")
    # results are keyed by length: a repeated one would be measured twice and reported once
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise LinearizeError(f"{option} names {', '.join(map(str, repeated))} more than once; got {value!r}")
    return numbers


def float_list(value: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise LinearizeError(f"{option} takes comma-separated fractions, e.g. 0,0.5,1; got {value!r}") from None


STDOUT = Path("-")  # `--json -`: the results on stdout, for a pipe (`| jq`); the table then goes to stderr


def print_table(
    title: str, header: list[str], rows: list[list[str]], caption: str | None = None, stderr: bool = False
) -> None:
    """A table on stdout (stderr if `stderr`), its text as it is: model names, paths and --text specs may hold
    [brackets], which rich would read as markup (and drop, or fail on)."""
    table = Table(title=escape(title), caption=caption and escape(caption))
    for i, column in enumerate(header):
        table.add_column(escape(column), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    (console if stderr else stdout_console()).print(table)


def check_output_file(path: Path | None, option: str, example: str, stdout: bool = False) -> None:
    """Refuse an output file path (--json, --plot) that cannot be written, before the work rather than after: one
    that names a folder, or lies under a file or a folder that cannot be written. With `stdout`, '-' is stdout."""
    from ..outputs import check_writable

    if path is None or (stdout and path == STDOUT):
        return
    if path == STDOUT:
        raise LinearizeError(f"{option} writes a file, not to stdout: give a file path, e.g. {option} {example}")
    if path.expanduser().is_dir():
        raise LinearizeError(f"{option} {path} is a folder; give a file path, e.g. {option} {path / example}")
    check_writable(path, what=f"{option} file")


def write_outputs(payload: dict, specs, json_path: Path | None, record_name: str | None, quiet: bool) -> None:
    """--json PATH, and the record in MODEL's folder (None: --no-record). A folder that cannot take the record (a
    read-only model store) gets a warning: the results are printed and, with --json, written."""
    from ..comparison import json_text, record, write_json

    written = []
    if json_path == STDOUT:
        sys.stdout.write(json_text(payload, indent=2) + "\n")
    elif json_path is not None:
        try:
            written.append(write_json(json_path, payload))
        except OSError as error:
            raise LinearizeError(f"cannot write --json {json_path}: {error.strerror}") from None
    if record_name is not None:
        try:
            written.append(record(specs[0], record_name, payload))
        except OSError as error:
            console.print(
                f"[yellow]Not recorded:[/] cannot write {record_name} into the model's folder ({error.strerror}); "
                "pass --no-record to skip it, --json PATH to keep the results",
                highlight=False,
                soft_wrap=True,
            )
    for path in filter(None, written):
        if not quiet:
            console.print(f"[green]Wrote[/] {escape(str(path))}", highlight=False, soft_wrap=True)


MODEL_HELP = "A converted model folder, any causal LM folder or hub id, or 'embedded' (the embedded SmolLM2)."
AGAINST_HELP = (
    "The model to compare with (same kinds as MODEL). Default: the source a converted folder records (a conversion "
    "of a local folder records none: name it); nothing for other models."
)
JSON_HELP = "Also write the results to this JSON file ('-': to stdout, the table then to stderr)."
RECORD_HELP = "Do not write the results into MODEL's folder (linearize_eval.json / linearize_bench.json)."
