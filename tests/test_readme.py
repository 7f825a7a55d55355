"""The README's library example runs as printed, on a tiny local model in place of the Hub id."""

import re
from pathlib import Path

from transformers import AutoModelForCausalLM

from linearize import sources
from tests.tiny import source_folder

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_example_converts_and_saves(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Library\n\n```python\n(.*?)```", readme, re.S).group(1)
    hub_id = re.search(r'source = "([^"]+)"', example).group(1)
    folder = source_folder(tmp_path / "source", family="qwen3")
    monkeypatch.chdir(tmp_path)
    exec(example.replace(f'"{hub_id}"', f'"{folder}"'), {})  # noqa: S102 -- our own README
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / re.search(r'save_model\(.*"(.+)"\)', example).group(1))
    assert saved.config.linearize["method"] == "liger" and saved.config.linearize["softmax_layers"]


def test_the_library_examples_of_evaluation_speed_and_fine_tuning_run(tmp_path, monkeypatch):
    """Both blocks as printed, on a tiny model where the embedded model's cache would be (its real weights take a
    minute here: tests/test_embedded.py covers them)."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\n### Evaluation, speed and fine-tuning\n(.*?)\n### ", readme, re.S).group(1)
    evaluation, fine_tuning = re.findall(r"```python\n(.*?)```", section, re.S)
    source_folder(tmp_path / "cache" / sources.EMBEDDED_NAME)
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(evaluation, names)  # noqa: S102 -- our own README
    assert set(names["quality"]) == {"liger", "original"} and names["quality"]["liger"]["passkey"]["contexts"]
    assert [row["context"] for row in names["speed"]["rows"]] == [256]
    exec(fine_tuning, names)  # noqa: S102
    assert names["folder"] == Path("runs/liger/model")
    model = AutoModelForCausalLM.from_pretrained(names["folder"])
    assert model.config.linearize["method"] == "liger"
