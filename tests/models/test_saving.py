"""A converted model's folder: saved and loaded back through transformers' Auto classes (and remote code), edited
or partial folders refused or completed, as users load what `linearize convert` and `finetune` write."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from linearize.convert import convert_model, plan_conversion
from tests.tiny import FAMILIES, cache_of, converted_model, source_model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_reproduces_logits_exactly(family, tmp_path):
    from linearize.convert import save_model

    model = converted_model(family, "liger")
    save_model(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is type(model)
    ids = torch.randint(3, 128, (2, 25))
    assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert reloaded.config.layer_types == model.config.layer_types
    assert "hybrid_sliding" in reloaded.config.layer_types
    assert reloaded.config.linearize["method"] == "liger"


@pytest.mark.parametrize("method", ["liger", "still"])
def test_gemma3_with_every_layer_converted_saves_rope_parameters_that_load(method, tmp_path):
    """Gemma 3 keys its rope_parameters by the source's layer types. With every layer converted, transformers
    validated the config against the methods' layer types, took the per-type dicts for one global dict and added a
    `"rope_type"` beside them (warning of unrecognized keys as it saved): transformers 5.17 then failed to load the
    folder ("'str' object has no attribute 'get'"), and the family config carried the stray key on later versions."""
    model = converted_model("gemma3_text", method, convert_layers="all")
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert set(reloaded.config.family_config().rope_parameters) == {"full_attention", "sliding_attention"}
    ids = torch.randint(3, 128, (2, 12))
    assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


EDITS = {  # a hand edit of a converted folder's config.json -> what the error says
    "window": (lambda c: c["linearize"].update(window=-3), "linearize.window in the config is the number of keys"),
    "window-text": (lambda c: c["linearize"].update(window="8"), "linearize.window in the config is the number"),
    "sinks": (lambda c: c["linearize"].update(sinks=8), "linearize.sinks in the config must be between 0 and window"),
    "no-block": (lambda c: c.pop("linearize"), "has no linearize block (the method"),
    "no-method": (lambda c: c["linearize"].pop("method"), "linearize block names no method"),
    "no-layer-types": (lambda c: c.pop("layer_types"), "lists 0 layer_types for its 2 layers"),
    "kept-layer-out-of-range": (
        lambda c: c["linearize"].update(softmax_layers=[5]),
        "linearize.softmax_layers [5] names layers outside 0-1",
    ),
    "kept-layer-typed-as-converted": (
        lambda c: c["linearize"].update(softmax_layers=[0]),
        "layer_types disagree with linearize.softmax_layers: layer 0 is 'hybrid_sliding'",
    ),
    "converted-layer-typed-as-kept": (
        lambda c: c.update(layer_types=["full_attention", "hybrid_sliding"]),
        "layer_types disagree with linearize.softmax_layers: layer 0 is 'full_attention'",
    ),
    "source-layer-types": (
        lambda c: c.update(source_layer_types=["full_attention"]),
        "lists 1 source_layer_types for its 2 layers",
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_config_is_refused_by_name(edit, tmp_path):
    """A converted folder whose config.json was edited into what no conversion writes fails to load with the field
    and the fix named, not with a TypeError or IndexError from deep inside, a negative tensor size, or (a kept layer
    the layer types call converted) a model that loads and computes something else than the folder says."""
    import json

    from linearize.errors import LinearizeError

    converted_model("llama", "liger").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    change, message = EDITS[edit]
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LinearizeError, match=re.escape(message)) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "re-run the conversion" in str(error.value)


def run_fresh_python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python process, offline, without this process's environment, as a user's own script
    runs; but with its PYTHONPATH, which puts the oldest transformers first under `make test-floor` (without it, the
    script ran the newest), and with `cwd` as Hugging Face's home: remote code is copied there, not into the user's
    ~/.cache/huggingface."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(cwd / "hf-home")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env)


def test_a_still_folder_missing_its_feature_maps_loads_them_as_from_config(tmp_path):
    """STILL's NP-Maps are parameters transformers has no initialisation for: a folder that lacks them (an edited or
    partial checkpoint) loaded them as uninitialised memory (1e-38 here, NaN in this test's scratch memory). They
    take `NPMap.reset_parameters`' values, as `from_config` gives, and transformers reports them missing; the maps the
    folder holds are loaded as saved."""
    from safetensors.torch import load_file, save_file

    model = converted_model("llama", "still")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if "layers.0.self_attn.q_map" not in name}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {f"model.layers.0.self_attn.q_map.{name}" for name in ("householder", "linear")}
    missing = reloaded.model.layers[0].self_attn.q_map
    assert torch.isfinite(missing.householder).all() and missing.householder.abs().sum() > 0
    assert torch.equal(missing.linear, torch.eye(16).expand(4, 16, 16))
    for name, tensor in kept.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert torch.isfinite(reloaded(torch.randint(3, 128, (1, 20))).logits).all()


@pytest.mark.parametrize("probe_rank", [None, 4])
def test_a_parallax_folder_missing_its_probe_loads_a_zero_probe(tmp_path, probe_rank):
    """A folder without r_proj (an edited or partial checkpoint) loaded transformers' random draw for it, and the
    model no longer computed the source's attention; it loads the zero probe of a conversion, which is exact."""
    from safetensors.torch import load_file, save_file

    source = source_model("llama")
    model = convert_model(source, plan_conversion(source.config, "llama", "parallax", probe_rank=probe_rank).config)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: t for k, t in weights.items() if ".r_proj." not in k}, tmp_path / "model.safetensors", {"format": "pt"}
    )
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(".r_proj." in name for name in info["missing_keys"])
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_use_cache_is_the_sources_and_survives_a_save(tmp_path):
    """`config.use_cache` reads as on the source's config (transformers dropped it from a config that does not
    declare it, so reading it raised AttributeError), and a value set on the model's config is saved and loaded."""
    from transformers import AutoConfig

    model = converted_model("llama", "liger")
    assert model.config.use_cache is True and model.config.to_dict()["use_cache"] is True
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).use_cache is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.use_cache is False
    assert cache_of(reloaded(torch.randint(3, 128, (1, 8)))) is None  # what its config says


def test_trust_remote_code_load_in_a_fresh_process(tmp_path):
    """Every family's folder loads with trust_remote_code in a process that never imported linearize (one process
    for all: each start costs seconds); so does a folder written by transformers' own `save_pretrained`, before
    and after such a load (Trainer checkpoints and `push_to_hub` save that way)."""
    from linearize.convert import save_model

    expected = {}
    for family in FAMILIES:
        model = converted_model(family, "liger")
        save_model(model, None, tmp_path / family)
        ids = torch.randint(3, 128, (1, 17))
        expected[family] = {"ids": ids, "logits": model(ids, use_cache=False).logits}
    model.save_pretrained(tmp_path / "plain")
    expected["plain"] = {**expected[family], "family": family}
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        from transformers import AutoModelForCausalLM
        assert "linearize" not in sys.modules
        assert transformers.__version__ == {transformers.__version__!r}, transformers.__version__  # this process's
        cases = torch.load({str(tmp_path / "expected.pt")!r})
        cases["resaved"] = cases["plain"]
        for folder, case in cases.items():
            if folder == "resaved":
                model.save_pretrained({str(tmp_path / "resaved")!r})  # the model loaded from "plain"
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + folder, trust_remote_code=True)
            difference = (model(case["ids"], use_cache=False).logits - case["logits"]).abs().max().item()
            assert difference < 1e-5, (folder, difference)  # another process may split matmuls differently
            assert model.config.base_model_type == case.get("family", folder)
        print("ok", type(model).__name__)
    """)
    result = run_fresh_python(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok LinearizeForCausalLM" in result.stdout
    assert list((tmp_path / "hf-home" / "modules").iterdir())  # the remote code was copied under tmp_path


def test_automodel_says_to_load_the_causal_lm(tmp_path):
    """A converted model has no headless class: `AutoModel` (feature extraction, embedding libraries) says which class
    loads it and where its decoder is, not transformers' "Unrecognized configuration class" with every config it
    knows."""
    from transformers import AutoModel

    model = converted_model("llama", "liger")
    model.save_pretrained(tmp_path)
    for load in (lambda: AutoModel.from_pretrained(tmp_path), lambda: AutoModel.from_config(model.config)):
        with pytest.raises(ValueError, match=r"AutoModelForCausalLM.*get_decoder\(\)") as error:
            load()
        assert "GPT2Config" not in str(error.value)


@pytest.mark.parametrize(
    "auto_class",
    ["AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"],
)
def test_the_auto_classes_of_other_heads_say_the_model_is_a_causal_lm(auto_class, tmp_path):
    """The heads transformers gives the source families (a reward model or classifier on an LLM) have no converted
    class: their Auto classes say so and where the hidden states are, not transformers' "Unrecognized configuration
    class" with the 2,000 characters of every config it knows."""
    import transformers

    model = converted_model("llama", "liger")
    model.save_pretrained(tmp_path)
    auto = getattr(transformers, auto_class)
    for load in (lambda: auto.from_pretrained(tmp_path), lambda: auto.from_config(model.config)):
        with pytest.raises(ValueError, match=r"causal LM only.*AutoModelForCausalLM.*get_decoder\(\)") as error:
            load()
        assert "GPT2Config" not in str(error.value)


def test_remote_code_says_how_to_install_linearize_when_missing(tmp_path):
    from linearize.convert import save_model
    from linearize.models.remote_code import INSTALL_COMMAND

    save_model(converted_model("llama", "swa"), None, tmp_path / "out")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["linearize"] = None  # as if the package were not installed
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True)
        except ImportError as error:
            print(error)
    """)
    result = run_fresh_python(script, tmp_path)
    assert INSTALL_COMMAND in result.stdout, result.stdout + result.stderr
