"""What a run tells its user: a progress bar on a terminal, plain log lines otherwise, and `metrics.jsonl` always."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from ..comparison import json_text
from ..errors import LinearizeError
from .checkpoint import RESUME


class _StageBar(Progress):
    """A stage's bar, and under it its last step's loss, lr and speed: in one row, rich narrowed every column alike
    on a narrow terminal (80 columns) until neither the step count nor the times showed."""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield Text(task.fields["status"], no_wrap=True, overflow="ellipsis")


class Reporter:
    """Progress and metrics of one process (only the main process of a distributed run reports).

    Args:
        metrics_file: every record is appended to it as one JSON line; None writes nothing.
        quiet: no progress and no log lines but warnings (metrics are still written).
        enabled: False on non-main processes: nothing at all.
        console: where messages go (stderr by default); a terminal gets a live bar, anything else (a dumb terminal
            too) plain lines.
    """

    def __init__(self, metrics_file: Path | None, quiet: bool = False, enabled: bool = True, console=None):
        self.metrics_file = metrics_file if enabled else None
        self.console = console or Console(stderr=True, emoji=False)  # ':x:' in a path is text, not an emoji
        self.enabled = enabled
        self.verbose = enabled and not quiet
        self._bar: Progress | None = None
        self._task = None
        self._plain_every = 1
        self._started = time.perf_counter()

    def info(self, message: str) -> None:
        if self.verbose:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)  # paths may hold [brackets]

    def warning(self, message: str) -> None:
        """A line that --quiet does not hide: something the user may want to change."""
        if self.enabled:
            self.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    def record(self, **fields) -> None:
        if self.metrics_file is None:
            return
        try:
            with self.metrics_file.open("a") as f:
                f.write(json_text(fields) + "\n")  # a NaN loss as null: strict JSON readers refuse NaN
        except OSError as error:  # a full disk: a row cut short is cut off again by --resume (`truncate_metrics`)
            raise LinearizeError(
                f"cannot write the run's metrics to {self.metrics_file}: {error.strerror or error}. The run stopped; "
                "checkpoints written so far are kept: free some space (or fix the folder), then run the same recipe "
                f"(overrides included) again with {RESUME} to continue"
            ) from None

    def metrics_size(self) -> int:
        """Bytes of metrics written so far, what `truncate_metrics` takes to forget every later row."""
        if self.metrics_file is None or not self.metrics_file.is_file():
            return 0
        return self.metrics_file.stat().st_size

    def truncate_metrics(self, size: int) -> None:
        """Keep the first `size` bytes of metrics: a resumed run writes the later steps again, each once."""
        if self.metrics_file is not None and self.metrics_file.is_file():
            os.truncate(self.metrics_file, size)

    def start_stage(self, name: str, total_steps: int, done: int = 0) -> None:
        self._started = time.perf_counter()
        self._done_at_start = done
        if not self.verbose:
            return
        if self._redraws():
            self._bar = _StageBar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),  # the one column a narrow terminal narrows
                MofNCompleteColumn(table_column=Column(no_wrap=True)),
                TimeElapsedColumn(table_column=Column(no_wrap=True)),
                TextColumn("left"),
                TimeRemainingColumn(table_column=Column(no_wrap=True)),
                console=self.console,
                # the time left from every step since the stage (re)started, as the plain lines count it: rich's
                # default, the last 30 s alone, holds one step where steps are longer and shows no estimate at all
                speed_estimate_period=math.inf,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=total_steps, completed=done, status="")
        else:
            # about 20 lines per stage, and every line when the stage is short
            self._plain_every = max(1, total_steps // 20)
            self.info(f"{name}: {total_steps} optimizer steps" + (f", resuming after step {done}" if done else ""))

    def step(
        self, stage: str, step: int, total_steps: int, loss: float, lr: float, tokens_per_s: float, ce: float | None
    ) -> None:
        """`ce`: the next-token part of a distilling stage's loss, the one its held-out eval_loss measures."""
        next_token = f" (next-token {ce:.4g})" if ce is not None else ""
        status = f"loss {loss:.4g}{next_token}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        elif self.verbose and (step % self._plain_every == 0 or step == total_steps):
            elapsed = time.perf_counter() - self._started
            done = step - self._done_at_start
            left = elapsed / done * (total_steps - step) if done else 0.0
            self.info(f"{stage} step {step}/{total_steps}  {status}  {elapsed:.0f}s elapsed, {left:.0f}s left")

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        """A piece of work outside the stages (scoring layers): a bar on a terminal, a line at its end otherwise.
        Yields the callback that advances it by one of `total`."""
        started = time.perf_counter()
        if not (self.verbose and self._redraws()):
            yield lambda: None
            self.info(f"{name}: done in {time.perf_counter() - started:.0f}s")
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(name, total=total)
            yield lambda: bar.advance(task)

    def _redraws(self) -> bool:
        """Whether the console can redraw a bar in place: a terminal, but not a dumb one (TERM=dumb: Emacs' shell,
        some CI runners), where rich shows a bar only once it stops."""
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
