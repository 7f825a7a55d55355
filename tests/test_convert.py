"""`convert_and_save`, what `linearize convert` runs, called as a library function on tiny models."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize.convert
import linearize.evaluation
import linearize.publish
from linearize.convert import ConvertReport, convert_and_save, plan_conversion, save_model
from linearize.errors import LinearizeError
from tests.tiny import METHODS, VARIANTS, source_folder, source_model


class Recorder(ConvertReport):
    def __init__(self):
        self.events = []

    def step(self, text):
        self.events.append(text)

    def planned(self, plan):
        self.events.append("planned")

    def saved(self, conversion):
        self.events.append("saved")

    def compared(self, rows):
        self.events.append("compared")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(source_folder(tmp_path_factory.mktemp("source") / "tiny-llama"))


@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(linearize.convert.sources, "load", lambda *a, **k: pytest.fail("weights were loaded"))


def test_writes_a_folder_that_loads_and_reports_each_step(source, tmp_path):
    report = Recorder()
    conversion = convert_and_save(source, tmp_path / "out", "liger", report=report, window=8)
    assert conversion.output == tmp_path / "out" and conversion.tokenizer_saved and conversion.url is None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.linearize["window"] == 8
    steps = ["Reading the source config", "planned", f"Loading {source}", "Converting and saving", "saved"]
    assert report.events == steps
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_a_quoted_home_folder_is_expanded(source, tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    conversion = convert_and_save(source, "~/out", "swa")  # as `-o '~/out'` passes it
    assert conversion.output == tmp_path / "home" / "out" and (tmp_path / "home" / "out" / "config.json").exists()
    assert not (tmp_path / "~").exists()


def test_without_an_output_it_plans_and_reads_no_weights(source, no_weights):
    conversion = convert_and_save(source, None, "swa", softmax_layers="0")
    assert conversion.output is None and conversion.plan.settings["softmax_layers"] == [0]


def test_an_interrupted_replacement_keeps_the_old_folder(source, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    def interrupted(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(linearize.convert.LinearizeForCausalLM, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_and_save(source, tmp_path / "out", force=True)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"method": "liger-gla", "sinks": 4}, "--sinks does not apply to method 'liger-gla'"),
        ({"softmax_layers": "0,9"}, "the model has 2 layers"),
        ({"window": 100_000}, "--window 100000 is more tokens than the model reads"),
        ({"push_to_hub": "no-slash"}, "ORG/NAME"),
        ({"private": True}, "--private makes the repo that --push-to-hub creates private"),
    ],
)
def test_bad_input_is_named_before_any_weights_load(options, message, source, tmp_path, no_weights):
    with pytest.raises(LinearizeError, match=message):
        convert_and_save(source, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_is_refused_before_any_weights_load(tmp_path, no_weights):
    model = source_model("llama")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.save_pretrained(tmp_path / "bnb-4bit")
    with pytest.raises(LinearizeError, match=r"quantized checkpoint \(bitsandbytes\).*convert the unquantized model"):
        convert_and_save(str(tmp_path / "bnb-4bit"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_needs_force(source, tmp_path, no_weights):
    """Said for both who reach it: the command's option and the library functions' argument."""
    (tmp_path / "out").mkdir()
    with pytest.raises(LinearizeError, match=r"already exists; pass --force \(force=True\) to replace it"):
        convert_and_save(source, tmp_path / "out")
    with pytest.raises(LinearizeError, match=r"already exists; pass --force \(force=True\) to replace it"):
        save_model(None, None, tmp_path / "out")  # refused before the model is read


def test_verify_compares_the_saved_folder_with_the_source(source, tmp_path):
    report = Recorder()
    conversion = convert_and_save(source, tmp_path / "out", "parallax", device="cpu", verify=True, report=report)
    original, converted = conversion.comparison
    assert (original["model"], converted["model"]) == ("original", "converted")
    # Parallax is exact at conversion: the folder as it loads back must be the source
    assert converted["perplexity"] == pytest.approx(original["perplexity"], rel=1e-4)
    assert converted["sample"] == original["sample"]
    assert report.events[-2:] == ["Measuring perplexity and sampling", "compared"]


def test_verify_holds_one_model_at_a_time(source, tmp_path, monkeypatch):
    """The source is measured, its weights released, and only then the saved folder loads and is measured, both in
    the dtype the folder loads in: the source's float32 copy, the converted model around the source's tensors and
    the loaded folder held at once took three models' memory (five times a bfloat16 model's weights on a CPU)."""
    originals, built, measured = [], [], []
    convert_model, compare = linearize.convert.convert_model, linearize.evaluation.compare

    def convert(source_model, config):
        model = convert_model(source_model, config)
        originals.append(source_model)
        built.append(weakref.ref(model))
        return model

    def measure(models, *args, **kwargs):
        gc.collect()
        held = any(p.device.type != "meta" for p in originals[0].parameters())
        measured.extend((name, model.dtype, held, built[0]() is not None) for name, model in models.items())
        return compare(models, *args, **kwargs)

    monkeypatch.setattr(linearize.convert, "convert_model", convert)
    monkeypatch.setattr(linearize.evaluation, "compare", measure)
    conversion = convert_and_save(source, tmp_path / "out", "swa", dtype="bfloat16", device="cpu", verify=True)
    assert [row["model"] for row in conversion.comparison] == ["original", "converted"]
    # (model, its dtype, whether the source's weights are held, whether the model converted around them is alive)
    assert measured == [("original", torch.float32, True, False), ("converted", torch.float32, False, False)]


def test_an_interrupted_comparison_says_the_folder_is_saved(source, tmp_path):
    class InterruptedWhileComparing(Recorder):
        def step(self, text):
            if text.startswith("Measuring"):
                raise KeyboardInterrupt
            super().step(text)

    with pytest.raises(KeyboardInterrupt, match=r"interrupted after saving: .*out is complete"):
        convert_and_save(source, tmp_path / "out", "swa", device="cpu", verify=True, report=InterruptedWhileComparing())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.linearize["method"] == "swa"


@pytest.mark.parametrize(
    "failure,raised,message",
    [
        (LinearizeError("the Hub rejected the token (401)"), LinearizeError, r"rejected the token \(401\)\. The"),
        (KeyboardInterrupt(), KeyboardInterrupt, "interrupted before the Hub confirmed the commit"),
    ],
)
def test_a_failed_push_says_the_folder_is_saved(failure, raised, message, source, tmp_path, monkeypatch):
    def push(*args, **kwargs):
        raise failure

    monkeypatch.setattr(linearize.convert, "check_can_push", lambda token=None: "hf_token")
    monkeypatch.setattr(linearize.publish, "push", push)
    saved = "converted folder .*out is saved: push it with `linearize push .*out me/tiny-liger`"
    with pytest.raises(raised, match=f"{message}.* {saved}"):
        convert_and_save(source, tmp_path / "out", push_to_hub="me/tiny-liger")
    assert (tmp_path / "out" / "config.json").exists()


def test_the_push_checks_the_folder_with_the_source_released(source, tmp_path, monkeypatch):
    """The push loads the saved folder in a fresh process (its load check): the source model held here beside it
    took a second model's memory, which on a GPU sized for one model failed the check and sent nothing."""
    originals, held = [], []
    convert_model = linearize.convert.convert_model

    def convert(source_model, config):
        originals.append(source_model)
        return convert_model(source_model, config)

    def push(*args, **kwargs):
        held.append(any(p.device.type != "meta" for p in originals[0].parameters()))
        return "https://huggingface.co/me/tiny-liger"

    monkeypatch.setattr(linearize.convert, "convert_model", convert)
    monkeypatch.setattr(linearize.convert, "check_can_push", lambda token=None: "hf_token")
    monkeypatch.setattr(linearize.publish, "push", push)
    assert convert_and_save(source, tmp_path / "out", push_to_hub="me/tiny-liger").url.endswith("me/tiny-liger")
    assert held == [False]


def test_the_plan_counts_cache_bytes_in_the_dtype_the_model_loads_in(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from linearize import sources

    source_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.pop("dtype", None)  # a config that names no dtype: the weights load in theirs
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "src").dtype == torch.bfloat16
    loaded = sources.load_config(str(tmp_path / "src"))
    assert plan_conversion(loaded, "src", "liger").dtype_bytes == 2
    assert plan_conversion(loaded, "src", "liger", dtype="float32").dtype_bytes == 4
    loaded.dtype = None  # a Hub checkpoint's unread weights: taken as float32
    assert plan_conversion(loaded, "src", "liger").dtype_bytes == 4


def test_library_arguments_in_the_forms_python_users_write(tmp_path):
    """A torch.dtype and a list of layers work as their string forms; a dtype of another spelling is named."""
    from linearize import sources

    folder = source_folder(tmp_path / "src")
    model, _ = sources.load(str(folder), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    listed = plan_conversion(model.config, str(folder), "liger", softmax_layers=[0], dtype=torch.float32)
    assert listed.settings["softmax_layers"] == [0] and listed.dtype_bytes == 4
    with pytest.raises(LinearizeError, match="'bf16' is not one of auto, float32, bfloat16, float16"):
        sources.load(str(folder), dtype="bf16")
    with pytest.raises(LinearizeError, match="'fp16' is not one of auto, float32, bfloat16, float16"):
        plan_conversion(model.config, str(folder), "liger", dtype="fp16")


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_bfloat16_conversion_keeps_the_sources_rotary_tables_in_float32(family, tmp_path):
    """transformers keeps the rotary `inv_freq` in float32 in a bfloat16 model; cast to bfloat16 it puts RoPE's
    angles up to 0.9 rad off at 2K tokens (head dim 64). The converted model, which fine-tuning trains and selection
    scores, must keep the source's tables: those of the folder it saves, as it loads."""
    from linearize import sources
    from linearize.convert import convert_model, save_model

    source_model(family).save_pretrained(tmp_path / "src")
    source = sources.load_model(str(tmp_path / "src"), dtype="bfloat16")
    converted = convert_model(source, plan_conversion(source.config, "src", "liger").config)
    assert converted.dtype == torch.bfloat16
    buffers = {name: buffer.dtype for name, buffer in source.named_buffers()}
    assert {dtype for name, dtype in buffers.items() if "inv_freq" in name} == {torch.float32}
    assert {name: buffer.dtype for name, buffer in converted.named_buffers()} == buffers
    save_model(converted, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, converted(ids, use_cache=False).logits)


def test_a_head_the_source_loads_untied_stays_untied(tmp_path):
    """A checkpoint whose config says tie_word_embeddings but which stores its own lm_head (fine-tunes that trained
    the head, hand-edited configs) loads untied in transformers; the converted model must keep that head, in memory
    and as its folder loads back."""
    import json

    from linearize import sources
    from linearize.convert import convert_model, save_model

    source_model("mistral").save_pretrained(tmp_path / "src")  # untied: its own lm_head tensor
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    source = sources.load_model(str(tmp_path / "src"))
    assert source.lm_head.weight is not source.model.embed_tokens.weight
    converted = convert_model(source, plan_conversion(source.config, "src", "parallax").config)
    save_model(converted, None, tmp_path / "out")
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        expected = source(ids).logits
        torch.testing.assert_close(converted(ids, use_cache=False).logits, expected)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, expected)


@pytest.mark.parametrize("variant", METHODS)
def test_converting_copies_no_source_tensor_and_saving_and_loading_keep_the_dtype(variant, tmp_path):
    """A converted model is built around the source's own tensors (a copy would double a large model's memory), the
    parameters its method adds in the source's dtype; the folder stores the tied head once and loads back in that
    dtype, with no float32 tensor but the rotary tables transformers keeps in float32."""
    from safetensors import safe_open

    from linearize.convert import convert_model, save_model

    method, options = VARIANTS[variant]
    source = source_model("llama").to(torch.bfloat16)
    converted = convert_model(source, plan_conversion(source.config, "src", method, **options).config)
    tensors = {**dict(converted.named_parameters(remove_duplicate=False)), **dict(converted.named_buffers())}
    for name, tensor in [*source.named_parameters(remove_duplicate=False), *source.named_buffers()]:
        assert tensors[name].data_ptr() == tensor.data_ptr(), name
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    save_model(converted, None, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as saved:
        stored = set(saved.keys())  # noqa: SIM118 (a safe_open handle is not iterable)
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    wide = [name for name, t in [*reloaded.named_parameters(), *reloaded.named_buffers()] if t.dtype != torch.bfloat16]
    assert wide and all(name.endswith("inv_freq") for name in wide)
