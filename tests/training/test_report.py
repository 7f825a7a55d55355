"""`linearize.training.report`: what a run writes to metrics.jsonl and shows while it trains."""

import errno
import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from linearize.errors import LinearizeError
from linearize.training.report import Reporter


def test_metrics_that_are_not_finite_are_written_as_json_null(tmp_path):
    """A model that produces NaN has a NaN held-out loss at the baseline evaluation, written before the first step
    stops the run: json.dumps wrote NaN, a line that jq or JavaScript cannot read."""

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    reporter = Reporter(tmp_path / "metrics.jsonl")
    reporter.record(global_step=0, eval_loss=math.nan, eval_ppl=math.inf)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=strict) == {"global_step": 0, "eval_loss": None, "eval_ppl": None}


def test_a_metrics_row_that_cannot_be_written_stops_the_run_with_what_to_do(tmp_path, monkeypatch):
    """A full disk when a step's row is appended to metrics.jsonl (written every step, so often the first write to
    fail) ended the run with an OSError traceback; it must name the file and the cause, and say that --resume
    continues from the checkpoints kept."""
    open_file = Path.open

    def disk_full(path, mode="r", *args, **kwargs):
        if path.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", disk_full)
    reporter = Reporter(tmp_path / "metrics.jsonl")
    with pytest.raises(LinearizeError) as raised:
        reporter.record(global_step=3, loss=1.0)
    message = str(raised.value)
    assert "metrics.jsonl" in message and "No space left on device" in message and "--resume (resume=True)" in message


def test_the_bar_estimates_the_time_left_when_a_step_takes_over_half_a_minute():
    """rich estimates speed from the last 30 s of progress: with longer steps (a large model, a large batch) it held
    one step alone and showed '-:--:--' for the whole run. The estimate is the stage's average step since it started
    (or resumed), as the plain lines' is; the steps done before a resume are not counted as instant."""
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=True, get_time=lambda: now[0])
    reporter = Reporter(None, console=console)
    reporter.start_stage("stage 2/2 lora", 100, done=40)  # resumed after step 40
    try:
        for step in range(41, 45):
            now[0] += 45.0
            reporter.step("stage 2/2 lora", step, 100, 1.0, 1e-4, 100.0, None)
        assert reporter._bar.tasks[0].time_remaining == pytest.approx(56 * 45.0, rel=0.1)
    finally:
        reporter.end_stage()


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_a_terminal_that_cannot_redraw_gets_the_plain_lines(term, monkeypatch):
    """A terminal whose TERM is dumb (Emacs' shell, some CI runners' pseudo-terminals) cannot redraw a bar, so rich
    shows none until the bar stops: a run there printed no step, loss or time left for a whole stage."""
    monkeypatch.setenv("TERM", term)
    console = Console(file=io.StringIO(), force_terminal=True)
    reporter = Reporter(None, console=console)
    reporter.start_stage("stage 1/1 lora", 4)
    for step in range(1, 5):
        reporter.step("stage 1/1 lora", step, 4, 2.5, 1e-4, 100.0, None)
    reporter.end_stage()
    with reporter.task("scoring 2 layers", 2) as advance:
        advance()
    shown = console.file.getvalue()
    assert [line.split("  ")[0] for line in shown.splitlines() if " step " in line] == [
        f"stage 1/1 lora step {step}/4" for step in range(1, 5)
    ]
    assert "scoring 2 layers: done in" in shown


@pytest.mark.parametrize("width", [80, 100])
def test_the_bar_keeps_the_steps_and_times_on_a_narrow_terminal(width):
    """rich narrows every column of a bar wider than the terminal alike: on 80 columns (many terminals' default, a
    split pane) an attention-transfer stage showed its name and loss but no step count, no elapsed time and no time
    left ('… left …'). The bar, the step and the times now fit a line, the loss, lr and speed the next."""
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=True, get_time=lambda: now[0], width=width)
    reporter = Reporter(None, console=console)
    reporter.start_stage("stage 1/2 attention_transfer", 1000)
    try:
        for step in range(1, 5):
            now[0] += 45.0
            reporter.step("stage 1/2 attention_transfer", step, 1000, 0.001234, 1e-4, 12345.0, 2.345)
        shown = Console(file=io.StringIO(), width=width)
        shown.print(*reporter._bar.get_renderables())
        bar, status = shown.file.getvalue().splitlines()
    finally:
        reporter.end_stage()
    assert re.fullmatch(r"stage 1/2 attention_transfer .{10,} 4/1000 0:03:00 left 12:27:00 *", bar), bar  # a bar
    assert status.strip() == "loss 0.001234 (next-token 2.345)  lr 1.00e-04  12,345 tok/s"
