"""The README's library example runs as printed, on a tiny local model in place of the Hub id."""

import re
from pathlib import Path

from transformers import AutoModelForCausalLM

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
