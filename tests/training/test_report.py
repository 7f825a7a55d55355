"""`linearize.training.report`: what a run writes to metrics.jsonl."""

import json
import math

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
