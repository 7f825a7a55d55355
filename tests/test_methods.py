"""Method settings: declared once in `linearize.methods`, validated with messages that name the option, and seen by
the command line, recipes and converted configs without being restated."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from linearize import methods
from linearize.errors import LinearizeError
from linearize.methods import METHODS, method_settings
from tests.tiny import source_folder

# A test-only method: swa's layer with one more parameter, registered before the CLI and the recipe schema are built
# (a fresh interpreter), as a new method's declaration would be.
TOY_METHOD = """
import dataclasses, json, sys, transformers
from linearize import methods

@dataclasses.dataclass(frozen=True)
class ToySettings(methods.SinkWindowSettings):
    frobs: int = methods.setting(3, "the number of frobs per head", low=1)

methods.METHODS["toy"] = dataclasses.replace(methods.METHODS["swa"], name="toy", settings=ToySettings)

from typer.testing import CliRunner
from linearize.cli import app

results = [CliRunner().invoke(app, args) for args in json.loads(sys.argv[1])]
print(json.dumps([transformers.__version__, methods.__file__, [[r.exit_code, r.output] for r in results]]))
"""


def run_with_toy_method(*commands):
    """The results of `commands` in a fresh interpreter with the toy method, which runs this process's linearize and
    transformers: it keeps PYTHONPATH, which puts a checkout or the oldest transformers (`make test-floor`) first."""
    env = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PATH": "", "PYTHONSAFEPATH": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run(
        [sys.executable, "-c", TOY_METHOD, json.dumps([[str(a) for a in c] for c in commands])],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    version, methods_file, results = json.loads(done.stdout)
    assert (version, methods_file) == (transformers.__version__, methods.__file__)
    return results


def test_a_new_parameter_reaches_the_cli_the_recipe_and_the_config(tmp_path):
    src = source_folder(tmp_path / "source")
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("conversion: {method: toy, frobs: 0}\nstages:\n  - kind: lora\n")
    help_text, template, converted, too_few, elsewhere, recipe = run_with_toy_method(
        ["convert", "--help"],
        ["recipe", "init", "--method", "toy"],
        ["convert", src, "--method", "toy", "--frobs", "5", "-o", tmp_path / "out"],
        ["convert", src, "--method", "toy", "--frobs", "0", "--dry-run"],
        ["convert", src, "--method", "swa", "--frobs", "5", "--dry-run"],
        ["recipe", "validate", bad_recipe],
    )
    assert help_text[0] == 0 and "--frobs" in help_text[1] and "toy: the number of frobs per head" in help_text[1]
    assert template[0] == 0 and "  frobs: null" in template[1] and "(default 3)" in template[1]
    assert converted[0] == 0, converted[1]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["linearize"]
    assert saved == {"method": "toy", "window": 64, "sinks": 4, "frobs": 5, "softmax_layers": []}
    assert too_few[0] == 1 and "--frobs is the number of frobs per head: it must be at least 1, got 0" in too_few[1]
    assert elsewhere[0] == 1 and "--frobs does not apply to method 'swa'" in elsewhere[1]
    assert recipe[0] == 1 and "conversion.frobs is the number of frobs per head: it must be at least 1" in recipe[1]


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("liger", {"window": 0}, "--window is the number of keys .* it must be at least 1, got 0"),
        ("liger", {"window": 2.5}, "--window .* it must be a whole number, got 2.5"),
        ("liger", {"gate_source": "rope"}, "--gate-source .* it must be one of normed, raw, got 'rope'"),
        ("swa", {"window": 8, "sinks": 8}, "--sinks must be between 0 and window - 1 \\(7\\), got 8"),
        ("still", {"topk": 65}, "--topk must be a whole number of tokens between 1 and the chunk size \\(64\\)"),
        ("parallax", {"mix": 0.5}, "--mix does not apply to method 'parallax'"),
        ("liger", {"mix": float("nan")}, "--mix is the window branch's weight .* it must be a finite number, got nan"),
        ("liger", {"gate_normalizer": float("inf")}, "--gate-normalizer .* it must be a finite number, got inf"),
        ("still", {"topk": float("nan")}, "--topk .* it must be a finite number, got nan"),
    ],
)
def test_bad_settings_name_the_option_and_the_valid_values(method, options, message):
    with pytest.raises(LinearizeError, match=message):
        method_settings(method, **options)


def test_settings_fill_defaults_and_normalise():
    assert method_settings("still", topk=0.125).topk == 8  # a ratio of the chunk becomes a count
    assert method_settings("parallax").window is None
    liger = method_settings("liger", mix=0.75)
    assert (liger.window, liger.sinks, liger.mix) == (64, 0, 0.75)


def test_saved_settings_load_with_defaults_for_newer_parameters():
    """A folder saved before a parameter existed loads with its default, which is what older code did."""
    settings = METHODS["liger"].settings.from_saved(
        {"method": "liger", "window": 32, "sinks": 0, "gate_normalizer": 16.0, "gate_source": "normed"}, "liger"
    )
    assert (settings.window, settings.mix) == (32, 0.5)
