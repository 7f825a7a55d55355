"""`linearize eval --lm-eval`: lm-evaluation-harness on a converted model, with a local task (no downloads)."""

import json
import sys

import pytest
from typer.testing import CliRunner

from linearize.cli import app
from tests.tiny import source_folder

pytest.importorskip("lm_eval")
runner = CliRunner()

TASK = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_task_on_a_converted_model(tmp_path):
    records = [{"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}"], "label": i % 2} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    src = source_folder(tmp_path / "src")
    assert runner.invoke(app, ["convert", str(src), "--window", "8", "-o", str(tmp_path / "liger")]).exit_code == 0
    options = ["--lm-eval", "tiny_choice", "--lm-eval-include", str(tmp_path / "tasks"), "--passkey-contexts", "none"]
    options += ["--against", str(src), "--context", "32", "--windows", "1"]
    result = runner.invoke(app, ["eval", str(tmp_path / "liger"), *options])
    assert result.exit_code == 0, result.output
    assert "lm-eval tiny_choice acc,none" in result.stdout
    accuracy = json.loads((tmp_path / "liger" / "linearize_eval.json").read_text())["results"]["liger"]["lm_eval"]
    assert 0.0 <= accuracy["tiny_choice"]["acc,none"] <= 1.0


def test_lm_eval_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    result = runner.invoke(app, ["eval", "embedded", "--lm-eval", "hellaswag", "--no-record"])
    assert result.exit_code != 0 and "pip install 'linearize[lm-eval]'" in result.output
