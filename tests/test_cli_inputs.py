"""Inputs the command line must refuse with a clear message and a non-zero exit, losing nothing (issue #18)."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from tokenizers import processors
from typer.testing import CliRunner

from linearize.cli import app
from linearize.convert import plan_conversion, save_model
from linearize.errors import LinearizeError
from linearize.generation import build_prompt, generate
from linearize.models.remote_code import INSTALL_COMMAND
from linearize.publish import render_model_card
from tests.tiny import CONFIGS, converted_model, source_folder, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = b"caf\xe9 w5 w6\n"  # Latin-1 'é'


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("source") / "tiny-llama")


def test_eval_text_that_is_not_utf8(source, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(NOT_UTF8)
    result = invoke("eval", source, "--text", text, "--passkey-contexts", "none", "--no-record")
    assert result.exit_code == 1
    assert f"{text} is not UTF-8 text (byte 0xe9" in result.output and "iconv" in result.output
    assert "Traceback" not in result.output and text.read_bytes() == NOT_UTF8


def test_jsonl_data_that_is_not_utf8(tmp_path):
    from linearize.data import DataError, DataSource
    from linearize.training.data import DataConfig, load_data

    records = tmp_path / "records.jsonl"
    records.write_bytes(b'{"text": "w1 w2"}\n{"text": "' + NOT_UTF8.strip() + b'"}\n')
    with pytest.raises(DataError, match=r"records.jsonl is not UTF-8 text \(byte 0xe9"):
        load_data(DataConfig(sources=[DataSource(path=str(records))], seq_len=4, held_out=0), tiny_tokenizer())


def test_recipe_validate_on_a_binary_file(tmp_path):
    recipe = tmp_path / "picture.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    result = invoke("recipe", "validate", recipe)
    assert result.exit_code == 1
    assert f"recipe file '{recipe}' is not UTF-8 text (byte 0x89 at offset 0" in result.output
    assert "linearize recipe init" in result.output and "Traceback" not in result.output


def test_generate_an_empty_prompt(source):
    for chat in ("--no-chat", "--chat"):  # the tiny tokenizer adds no BOS, and its template adds no token
        result = invoke("generate", source, "", chat, "--max-new-tokens", 2)
        assert result.exit_code == 1, result.output
        assert "the prompt '' gives no token for the model to continue: give it some text" in result.output


def test_an_empty_prompt_after_a_bos_is_fine():
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert build_prompt(tokenizer, "", chat=False).tolist() == [[tokenizer.bos_token_id]]
    with pytest.raises(LinearizeError, match="drop --no-chat"):
        build_prompt(tiny_tokenizer(), "", chat=False)


def test_a_chat_prompt_without_a_chat_template_is_the_users_to_fix():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(LinearizeError, match="this tokenizer has no chat template; drop --chat") as error:
        build_prompt(tokenizer, "w5 w6", chat=True)
    assert isinstance(error.value, ValueError)  # as before, for callers that caught that


def test_negative_temperature_is_refused(source):
    result = invoke("generate", source, "w5", "--temperature", "-1")
    assert result.exit_code == 2 and "Invalid value for '--temperature': Input should be greater" in result.output
    with pytest.raises(LinearizeError, match="the temperature must be 0 \\(greedy\\) or more, got -1"):
        generate(None, None, "w5", temperature=-1.0)  # refused before the model is touched


@pytest.mark.parametrize(
    "method,options,name",
    [("swa", {"window": 100_000_000}, "--window"), ("parallax", {"window": 513}, "--window"),
     ("still", {"chunk_size": 1024}, "--chunk-size")],
)  # fmt: skip
def test_token_counts_beyond_the_model_context(method, options, name):
    with pytest.raises(LinearizeError) as error:
        plan_conversion(CONFIGS["llama"](), "tiny", method, **options)
    value = next(iter(options.values()))
    assert str(error.value) == (
        f"{name} {value} is more tokens than the model reads (512, its config's max_position_embeddings): "
        "choose at most 512"
    )
    assert plan_conversion(CONFIGS["llama"](), "tiny", "swa", window=512).settings["window"] == 512


def test_convert_refuses_a_window_beyond_the_context_before_writing(source, tmp_path):
    result = invoke("convert", source, "--window", 100_000_000, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "--window 100000000 is more tokens than the model reads (512" in result.output
    assert not (tmp_path / "out").exists()


_REPORT_HEAVY_MODULES = """
import json, sys
print(json.dumps([m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]))
"""


def _heavy_modules_after(code: str) -> list[str]:
    """The torch and transformers modules that running `code` in a fresh interpreter imports."""
    script = textwrap.dedent(code) + _REPORT_HEAVY_MODULES
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--nonsense"], ["finetune", "--help"]])
def test_help_and_usage_errors_import_neither_torch_nor_transformers(argv):
    code = f"""
        import runpy, sys
        sys.argv = ["linearize", *{argv!r}]
        try:
            runpy.run_module("linearize", run_name="__main__")
        except SystemExit:
            pass
    """
    assert _heavy_modules_after(code) == []


def test_the_package_exports_its_error_without_loading_torch():
    code = """
        import linearize
        from linearize import LinearizeError
        from linearize.errors import LinearizeError as defined
        assert "LinearizeError" in linearize.__all__ and LinearizeError is defined
    """
    assert _heavy_modules_after(code) == []


@pytest.mark.parametrize(
    "imports",
    [
        "import linearize; import transformers",  # the package first: registered once transformers loads
        "import transformers; import linearize",
        "import linearize.compat",  # a module of ours that loads transformers before the models are registered
    ],
)
def test_importing_linearize_registers_the_auto_classes(imports):
    code = f"""
        {imports}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        import linearize
        assert CONFIG_MAPPING["linearize"] is linearize.LinearizeConfig
        assert MODEL_FOR_CAUSAL_LM_MAPPING[linearize.LinearizeConfig] is linearize.LinearizeForCausalLM
    """
    assert "torch" in _heavy_modules_after(code)


def test_install_instructions_name_where_linearize_is_published(tmp_path):
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert f'pip install "linearize @ git+{url}"' == INSTALL_COMMAND
    out = save_model(converted_model("llama", "swa"), None, tmp_path / "out")
    for stub in ("configuration_linearize.py", "modeling_linearize.py"):
        assert INSTALL_COMMAND in (out / stub).read_text()
    card = render_model_card(out, "me/tiny")
    assert f"```bash\n{INSTALL_COMMAND}\n```" in card and "pip install linearize\n" not in card
    assert f"[linearize]({url})" in card and "pypi.org" not in card
