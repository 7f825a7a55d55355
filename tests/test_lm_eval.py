"""`linearize eval --lm-eval`: lm-evaluation-harness on a converted model, with a local task (no downloads)."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from linearize.cli import app
from tests.tiny import source_folder

lm_eval = pytest.importorskip("lm_eval")
runner = CliRunner()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The folder where datasets caches the tasks' records: under tmp_path, not the user's ~/.cache/huggingface
    (which gained a folder per run). datasets reads HF_DATASETS_CACHE when it is imported: setting the variable later
    changes nothing."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "datasets-cache"


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


def test_lm_eval_task_on_a_converted_model(tmp_path, datasets_cache):
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
    assert "lm-eval tiny_choice acc,none (6 items)" in " ".join(result.stdout.split())
    assert "sample_len" not in result.stdout  # lm-eval's item count is not a metric row
    accuracy = json.loads((tmp_path / "liger" / "linearize_eval.json").read_text())["results"]["liger"]["lm_eval"]
    assert 0.0 <= accuracy["tiny_choice"]["acc,none"] <= 1.0
    assert list(datasets_cache.glob("json/*"))  # the records were cached under tmp_path


def _tiny_task(folder: Path) -> Path:
    """The folder of task YAMLs that defines tiny_choice, on six records of the tiny vocabulary."""
    records = [{"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}"], "label": i % 2} for i in range(6)]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=folder / "data.jsonl"))
    return folder / "tasks"


def test_lm_eval_from_python_leaves_the_callers_random_state(tmp_path):
    """lm-eval seeds Python's, NumPy's and torch's generators for its run: an eval harness or notebook that calls
    `run_lm_eval` keeps its own random streams (they were reseeded to lm-eval's 0 and 1234)."""
    import random

    import numpy as np
    import torch

    from linearize.evaluation import run_lm_eval
    from tests.tiny import converted_model, tiny_tokenizer

    tasks = _tiny_task(tmp_path)
    model = converted_model("llama", "liger")
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    run_lm_eval(model, tiny_tokenizer(), ["tiny_choice"], include_path=str(tasks))
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_lm_eval_from_python_leaves_the_model_in_its_mode(tmp_path):
    """lm-eval puts the model it is handed in eval mode: a caller's model that was training goes on training."""
    from linearize.evaluation import run_lm_eval
    from tests.tiny import converted_model, tiny_tokenizer

    tasks = _tiny_task(tmp_path)
    model = converted_model("llama", "liger").train()
    run_lm_eval(model, tiny_tokenizer(), ["tiny_choice"], include_path=str(tasks))
    assert all(module.training for module in model.modules())


def test_lm_eval_takes_a_converted_model_as_causal_without_a_warning(tmp_path, caplog):
    """A converted model's type is not in transformers' causal-LM registry, and lm-eval warned that it might need
    trust_remote_code (it does not): a warning the user cannot act on."""
    from linearize.evaluation import run_lm_eval
    from tests.tiny import converted_model, tiny_tokenizer

    with caplog.at_level(logging.WARNING):
        run_lm_eval(
            converted_model("llama", "still"), tiny_tokenizer(), ["tiny_choice"], include_path=str(_tiny_task(tmp_path))
        )
    assert "neither marked as CausalLM" not in caplog.text


def test_lm_evals_notes_on_how_linearize_calls_it_are_not_printed(tmp_path):
    """lm-eval warned, for each model, that it was handed a loaded model (how linearize runs it: 'Many other model
    arguments may be ignored', 'Please do not launch via accelerate', 'neither marked as CausalLM') and ran
    `git describe` in the folder eval ran from, whose 'fatal: not a git repository' reached the log, --quiet too:
    lines that look like failures and that no user can act on."""
    _tiny_task(tmp_path)
    source_folder(tmp_path / "src")
    options = ["--lm-eval", "tiny_choice", "--lm-eval-include", "tasks", "--passkey-contexts", "none"]
    options += ["--context", "32", "--windows", "1", "--no-record", "-q"]
    checkout = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": checkout, "GIT_CEILING_DIRECTORIES": "/"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    result = subprocess.run([sys.executable, "-m", "linearize", "eval", "src", *options], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lm-eval tiny_choice acc,none" in " ".join(result.stdout.split())
    for noise in ("`pretrained` model kwarg", "already-initialized model", "neither marked as CausalLM", "fatal:"):
        assert noise not in result.stderr, result.stderr


def test_lm_eval_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    result = runner.invoke(app, ["eval", "embedded", "--lm-eval", "hellaswag", "--no-record"])
    assert result.exit_code != 0 and "pip install lm_eval" in result.output


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("dataset_path: nobody/no-such-dataset", "its dataset could not be downloaded (Couldn't reach"),  # offline
        ("dataset_path: json\ndataset_kwargs: {data_files: {test: data/missing.jsonl}}", "run from the folder"),
    ],
    ids=["hub-offline", "local-file-missing"],
)
def test_task_data_that_cannot_be_read_is_named_before_any_model_loads(tmp_path, monkeypatch, data, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    task = "\n".join(line for line in TASK.splitlines() if "data" not in line and "test: " not in line)
    (tmp_path / "tasks" / "unreadable.yaml").write_text(task.replace("tiny_choice", "unreadable") + "\n" + data)
    options = ["--lm-eval", "unreadable", "--lm-eval-include", "tasks", "--no-record"]
    src = source_folder(tmp_path / "src")
    monkeypatch.setattr("linearize.generation.load_for_inference", lambda *a, **k: pytest.fail("a model loaded"))
    result = runner.invoke(app, ["eval", str(src), *options])
    assert result.exit_code == 1 and "lm-eval task unreadable: " in result.output and message in result.output


def test_task_data_is_read_without_lm_evals_deprecated_loader(tmp_path):
    """lm-eval 0.4.12 deprecates `TaskManager.load_task_or_group` for `load`: the check before any model loads uses
    `load` where lm-eval has it, and `load_task_or_group` only on older lm-eval (which has nothing else)."""
    from linearize.evaluation import check_lm_eval_tasks

    (tmp_path / "data.jsonl").write_text(json.dumps({"question": "w1 w2", "choices": ["w3", "w4"], "label": 0}))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module="linearize")
        check_lm_eval_tasks(["tiny_choice"], str(tmp_path / "tasks"))


def test_a_task_folder_that_does_not_exist_is_named(tmp_path):
    result = runner.invoke(app, ["eval", "--lm-eval", "arc_easy_local", "--lm-eval-include", str(tmp_path / "nope")])
    assert result.exit_code == 1 and f"--lm-eval-include '{tmp_path / 'nope'}' is not a folder" in result.output


# ---------------------------------------------------------------- the task YAMLs users copy (recipes/lm-eval)

LOCAL_TASKS = Path(__file__).resolve().parents[1] / "recipes" / "lm-eval"
ARC = {"question": "Which is a liquid?", "choices": {"text": ["ice", "water", "rock"], "label": ["A", "B", "C"]}}
HELLASWAG = {
    "activity_label": "Making tea",
    "ctx_a": "A man boils water in a kettle.",
    "ctx_b": "he [step] pours it",
    "endings": ["into a cup [title] with a bag.", "on the  floor.", "into the sky.", "back."],
    "label": "0",
}


def _task_yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_local_arc_easy_prompts_as_lm_eval_does():
    ours = _task_yaml(LOCAL_TASKS / "arc_easy_local.yaml")
    theirs = _task_yaml(Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml")
    for field in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list"):
        assert ours[field] == theirs[field], field


def test_local_hellaswag_prompts_as_lm_eval_does():
    import datasets
    from lm_eval.tasks.hellaswag import utils

    sys.path.insert(0, str(LOCAL_TASKS))
    try:
        import hellaswag_local
    finally:
        sys.path.remove(str(LOCAL_TASKS))
    records = datasets.Dataset.from_list([HELLASWAG, {**HELLASWAG, "label": "2", "ctx_b": ""}])
    assert hellaswag_local.prepare(records).to_list() == utils.process_docs(records).to_list()
    ours = _task_yaml(LOCAL_TASKS / "hellaswag_local.yaml")
    theirs = _task_yaml(Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml")
    for field in ("output_type", "doc_to_text", "doc_to_choice", "metric_list"):
        assert ours[field] == theirs[field], field


def test_local_arc_easy_and_hellaswag_run_offline_from_jsonl(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    arc = [{**ARC, "id": str(i), "answerKey": "AB"[i % 2]} for i in range(3)]
    (data / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    swag = [{**HELLASWAG, "label": str(i)} for i in range(3)]
    (data / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swag))
    src = source_folder(tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # the YAMLs name their data relative to the folder linearize runs from
    options = ["--lm-eval", "arc_easy_local,hellaswag_local", "--lm-eval-include", str(LOCAL_TASKS)]
    options += ["--passkey-contexts", "none", "--context", "32", "--windows", "1", "--json", "eval.json", "--no-record"]
    result = runner.invoke(app, ["eval", str(src), *options])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval.json").read_text())["results"]["src"]["lm_eval"]
    assert set(scores) == {"arc_easy_local", "hellaswag_local"}
    for task in scores.values():
        assert task["sample_len"] == 3
        assert 0.0 <= task["acc,none"] <= 1.0 and 0.0 <= task["acc_norm,none"] <= 1.0
