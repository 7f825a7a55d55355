"""The command line, end to end on tiny models (Typer's CliRunner)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

import linearize.convert
from linearize.cli import app
from tests.tiny import FAMILIES, METHODS, VARIANTS, source_folder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("source") / "tiny-llama")


def test_version_option_and_command_print_the_same_line():
    flag, command = invoke("--version"), invoke("version")
    assert flag.exit_code == command.exit_code == 0 and flag.output == command.output
    assert flag.output.startswith("linearize ") and "torch" in flag.output


def test_help_prints_each_paragraph_as_one_wrapped_line():
    """A docstring's line breaks do not reach the help: the command list shows each summary whole, unbroken."""
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    assert "compare with the original: swa (training-free), Parallax (exact at conversion) and Liger" in listing.output
    assert "for MODEL (default: the embedded SmolLM2) and the model it is compared with" in listing.output
    push = runner.invoke(app, ["push", "--help"], env={"COLUMNS": "250"})
    assert "which layers were converted, the fine-tuning recipe" in push.output


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_each_family(family, tmp_path):
    src = source_folder(tmp_path / family, family)
    result = invoke("convert", src, "--method", "liger", "--window", 8, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.base_model_type == family
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "modeling_linearize.py").exists()


@pytest.mark.parametrize("variant", METHODS)
def test_convert_each_method_with_softmax_layers(variant, source, tmp_path):
    method, options = VARIANTS[variant]
    options = [x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", value)]
    result = invoke(
        "convert", source, "--method", method, *options, "--softmax-layers", "every:2", "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "o").config
    assert config.linearize["softmax_layers"] == [0]
    assert config.linearize["method"] == method
    assert all(config.linearize[key] == value for key, value in VARIANTS[variant][1].items())


def test_dry_run_prints_the_plan_and_writes_nothing(source, tmp_path, monkeypatch):
    monkeypatch.setattr(linearize.convert, "convert_model", lambda *a: pytest.fail("dry run loaded weights"))
    result = invoke("convert", source, "--dry-run", "--softmax-layers", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "layers 0" in result.output and "liger" in result.output and "softmax" in result.output
    assert "8192 tokens" in result.output
    assert not (tmp_path / "out").exists()


def test_a_dry_run_prints_its_plan_on_stdout(source):
    """The plan is a dry run's result, for `> plan.txt` as `finetune --dry-run` has it: it went to stderr, with the
    spinners. A conversion's plan stays on stderr, a note on its way to the saved folder."""
    result = invoke("convert", source, "--dry-run", "--softmax-layers", "auto:1", "--calibration-windows", "1")
    assert result.exit_code == 0, result.output
    assert "Conversion plan" in result.stdout and "Layer scores" in result.stdout
    assert "Conversion plan" not in result.stderr


def test_quiet_convert_prints_only_where_the_model_went(source, tmp_path):
    result = invoke("convert", source, "-q", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Saved ") and "layers 0" not in result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.linearize["method"] == "liger"
    result = invoke("convert", source, "-q", "--dry-run")
    assert result.exit_code == 0 and "layers 0" in result.output  # a dry run's plan is its result


def test_a_quiet_dry_run_shows_its_plan_and_no_spinner_or_bar(source, monkeypatch):
    """A dry run's plan is its result, so --quiet keeps it; it also turned --quiet's other promise off: on a terminal
    the spinners and the layer scoring's bar showed all the same."""
    import io

    from rich.console import Console

    import linearize.cli.common
    import linearize.cli.convert

    terminal = Console(file=io.StringIO(), force_terminal=True, emoji=False)
    monkeypatch.setattr(linearize.cli.common, "console", terminal)
    monkeypatch.setattr(linearize.cli.convert, "console", terminal)
    result = invoke("convert", source, "--dry-run", "-q", "--softmax-layers", "auto:1", "--calibration-windows", "1")
    assert result.exit_code == 0, result.output
    assert "Conversion plan" in result.stdout and "Layer scores" in result.stdout
    assert terminal.file.getvalue() == ""


def test_dry_run_shows_the_family_and_its_sliding_layers(tmp_path):
    src = source_folder(tmp_path / "gemma", "gemma2")
    result = invoke("convert", src, "--dry-run")
    assert result.exit_code == 0, result.output
    output = re.sub(r"[│\s]+", " ", result.output)  # rich wraps table cells
    assert "attention logits capped at 0.05" in output and "softmax scale 1/sqrt(24)" in output
    assert "softmax (sliding_attention)" in output and "--convert-layers all converts them" in output
    result = invoke("convert", src, "--convert-layers", "all", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.linearize["softmax_layers"] == []
    # a sliding-window layer the user keeps by name is not one --convert-layers left: the plan must not say so
    result = invoke("convert", src, "--convert-layers", "all", "--softmax-layers", "0", "--dry-run")
    output = re.sub(r"[│\s]+", " ", result.output)
    assert result.exit_code == 0 and "softmax (sliding_attention)" in output, result.output
    assert "--convert-layers all converts them" not in output
    result = invoke("convert", src, "--convert-layers", "some", "--dry-run")
    assert result.exit_code != 0 and "global" in result.output


def test_generate_tells_whitespace_from_an_immediate_end(source, tmp_path, monkeypatch):
    """A reply of spaces alone (a random or weak model's) is not one that ended at once."""
    import linearize.generation

    monkeypatch.setattr(linearize.generation, "generate", lambda *args, **kwargs: "        ")
    result = invoke("generate", source, "w5 w6", "--max-new-tokens", 8)
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "Only whitespace generated" in shown and "ended its reply" not in shown
    monkeypatch.setattr(linearize.generation, "generate", lambda *args, **kwargs: "")
    result = invoke("generate", source, "w5 w6", "--max-new-tokens", 8)
    assert "Nothing generated: the model ended its reply at once" in " ".join(result.output.split())


def test_generate_streams_text(source, tmp_path):
    assert invoke("convert", source, "-o", tmp_path / "out").exit_code == 0
    result = invoke("generate", tmp_path / "out", "w5 w6 w7", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 5  # five word-level tokens were streamed
    assert "Nothing generated" not in result.output


def test_generate_takes_a_dtype_and_runs_in_float32_on_a_cpu_by_default(source, tmp_path, monkeypatch):
    """A bfloat16 folder generates in bfloat16 with --dtype bfloat16: on a CPU, auto is float32, twice the memory,
    which an 8B model on a machine sized for its bfloat16 weights does not have."""
    assert invoke("convert", source, "--dtype", "bfloat16", "-o", tmp_path / "out").exit_code == 0
    used = []
    monkeypatch.setattr(linearize.generation, "generate", lambda model, *args, **kwargs: used.append(model.dtype))
    for dtype in ("bfloat16", "auto"):
        result = invoke("generate", tmp_path / "out", "w5 w6", "--device", "cpu", "--dtype", dtype)
        assert result.exit_code == 0, result.output
    assert used == [torch.bfloat16, torch.float32]


def test_generate_samples_reproducibly_with_a_seed(source, tmp_path):
    """--seed makes a sampled reply repeatable, and it is the text `model.generate` gives after the same seed."""
    from linearize.generation import build_prompt

    def sample(seed):
        result = invoke("generate", source, "w5 w6 w7", "--max-new-tokens", 12, "--temperature", 1.5, "--seed", seed)
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    first = sample(3)
    assert sample(3) == first and sample(4) != first
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = build_prompt(tokenizer, "w5 w6 w7")
    torch.manual_seed(3)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True, temperature=1.5)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == first


def test_the_librarys_generate_with_a_seed_leaves_the_callers_random_state_alone(source):
    """`generate(seed=...)` repeats a sample without reseeding the program that calls it."""
    from linearize.generation import generate

    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = generate(model, tokenizer, "w5 w6 w7", max_new_tokens=8, temperature=1.5, seed=3)
    assert torch.equal(torch.rand(4), expected)
    assert generate(model, tokenizer, "w5 w6 w7", max_new_tokens=8, temperature=1.5, seed=3) == first


def test_generate_reads_the_prompt_from_stdin_for_a_dash(source):
    def reply(*args, stdin=None):
        result = runner.invoke(app, ["generate", str(source), *args, "--max-new-tokens", "4"], input=stdin)
        assert result.exit_code == 0, result.output
        return result.stdout

    assert reply("-", stdin="w5 w6 w7\n") == reply("w5 w6 w7") != reply("w9")
    result = runner.invoke(app, ["generate", str(source), "-"], input=b"caf\xe9 w5")
    assert result.exit_code == 1 and "standard input is not UTF-8 text (byte 0xe9 at offset 3" in result.output


def test_generate_says_when_the_model_ends_its_reply_at_once(source, tmp_path, monkeypatch):
    import linearize.generation

    assert invoke("convert", source, "-o", tmp_path / "out").exit_code == 0
    monkeypatch.setattr(linearize.generation, "generate", lambda *args, **kwargs: "")  # an end-of-turn first
    result = invoke("generate", tmp_path / "out", "w5 w6 w7")
    assert result.exit_code == 0 and "Nothing generated: the model ended its reply at once" in result.output


def test_an_immediate_end_gives_only_the_hints_that_apply(source, tmp_path, monkeypatch):
    """--no-chat is suggested only where the chat template was used, and fine-tuning only for a converted model."""
    import linearize.generation

    monkeypatch.setattr(linearize.generation, "generate", lambda *args, **kwargs: "")
    shown = " ".join(invoke("generate", source, "w5 w6", "--no-chat").output.split())
    assert "Nothing generated: the model ended its reply at once" in shown
    assert "--no-chat" not in shown and "fine-tuned" not in shown
    shown = " ".join(invoke("generate", source, "w5 w6").output.split())
    assert "--no-chat continues the prompt as plain text" in shown and "fine-tuned" not in shown
    assert invoke("convert", source, "-o", tmp_path / "out").exit_code == 0
    shown = " ".join(invoke("generate", tmp_path / "out", "w5 w6").output.split())
    assert "a converted model is weak until fine-tuned" in shown and "--no-chat continues" in shown


def test_a_reply_of_special_tokens_is_not_called_an_end(source, monkeypatch):
    """A reply that reached --max-new-tokens in special tokens other than the end of turn printed nothing, and was
    reported as one that ended at once."""
    import linearize.generation

    def fake(model, tokenizer, prompt, *args, streamer=None, **kwargs):
        streamer.put(torch.tensor([[5, 6]]))  # the prompt
        for token in first:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return ""

    monkeypatch.setattr(linearize.generation, "generate", fake)
    first = [3, 3, 3]  # <unk>, special, not an end of turn
    shown = " ".join(invoke("generate", source, "w5 w6").output.split())
    assert "Nothing printed: the reply was 3 special tokens ('<unk> <unk> <unk>')" in shown
    assert "ended its reply" not in shown
    first = [2]  # </s>
    shown = " ".join(invoke("generate", source, "w5 w6").output.split())
    assert "Nothing generated: the model ended its reply at once" in shown


def test_existing_output_needs_force(source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = invoke("convert", source, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "already exists" in result.output and "--force" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert invoke("convert", source, "-o", tmp_path / "out", "--force").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.parametrize(
    "spec,message",
    [("1,x", "'x' is not a layer index"), ("every:0", "positive integer"), ("0,9", "the model has 2 layers")],
)
def test_malformed_softmax_layers(spec, message, source, tmp_path):
    result = invoke("convert", source, "--softmax-layers", spec, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert message in result.output


def test_missing_local_path(tmp_path):
    result = invoke("convert", "./no/such/folder", "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "does not exist" in result.output


def test_hub_id_while_offline(tmp_path):
    result = invoke("convert", "some-org/some-model", "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "HF_HUB_OFFLINE" in result.output and "local folder" in result.output


def test_unsupported_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    result = invoke("convert", tmp_path / "gpt2", "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "'gpt2' is not supported" in result.output and "llama, mistral, olmo2" in result.output


def test_option_that_does_not_apply_to_the_method(source, tmp_path):
    result = invoke("convert", source, "--method", "liger-gla", "--sinks", 4, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "--sinks does not apply to method 'liger-gla'" in result.output


@pytest.mark.parametrize("mix", ["0", "1", "1.5"])
def test_mix_outside_the_open_unit_interval(mix, source, tmp_path):
    result = invoke("convert", source, "--method", "liger", "--mix", mix, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "--mix is the window branch's weight" in result.output and "strictly between 0 and 1" in result.output
    assert not (tmp_path / "out").exists()


def test_mix_is_recorded_in_the_saved_config(source, tmp_path):
    result = invoke("convert", source, "--method", "liger", "--mix", "0.75", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["linearize"]["mix"] == 0.75


def test_interrupted_conversion_leaves_nothing_behind(source, tmp_path, monkeypatch):
    def interrupted(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(linearize.convert.LinearizeForCausalLM, "save_pretrained", interrupted)
    result = invoke("convert", source, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "interrupted" in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_output_option(source):
    result = invoke("convert", source)
    assert result.exit_code != 0
    assert "-o/--output" in result.output


def test_help_explains_every_option():
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    for option in (
        "--method",
        "--output",
        "--window",
        "--sinks",
        "--mix",
        "--softmax-layers",
        "--dtype",
        "--device",
        "--force",
        "--dry-run",
    ):
        assert option in result.output


def test_converted_dtype_option(source, tmp_path):
    assert invoke("convert", source, "--dtype", "bfloat16", "-o", tmp_path / "out").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("bogus", "Unknown kernel backend 'bogus' (LINEARIZE_BACKEND='bogus')"),
        ("fla", "this op has no 'fla' implementation yet (LINEARIZE_BACKEND='fla')"),  # liger's ops but GLA's prefill
        ("triton", "'triton' (LINEARIZE_BACKEND='triton') runs Triton kernels, which need CUDA tensors"),
    ],
)
def test_a_backend_that_cannot_run_is_an_error_line_in_the_cli(tmp_path, monkeypatch, backend, message):
    src = source_folder(tmp_path / "src")
    assert runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "liger")]).exit_code == 0
    monkeypatch.setenv("LINEARIZE_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    options = ["--context", "16", "--windows", "1", "--passkey-contexts", "none", "--no-record"]
    result = runner.invoke(app, ["eval", str(tmp_path / "liger"), "--against", str(src), *options])
    assert result.exit_code == 1 and f"Error: {message}" in result.output, result.output


def test_paths_and_names_with_brackets_are_printed_as_they_are(source, tmp_path):
    """Rich read `[v2]` in a message as a style and dropped it (`linearize finetune liger.yaml` named another file),
    and `[/b]` as a closing tag it failed on, a traceback after the work: paths, model names and a data source's
    `[split]` are printed as they are."""

    def shown(result) -> str:  # a long path may be wrapped over lines
        assert result.exit_code == 0, result.output
        return "".join(result.output.split())

    recipe = tmp_path / "liger[v2].yaml"
    assert f"linearizefinetune{recipe}" in shown(invoke("recipe", "init", "-o", recipe))
    assert f"OK{recipe}:" in shown(invoke("recipe", "validate", recipe))
    (tmp_path / "a[/b]").mkdir(parents=True)  # a[ holding b]
    assert str(tmp_path / "a[/b]" / "r.yaml") in shown(invoke("recipe", "init", "-o", tmp_path / "a[/b]" / "r.yaml"))
    assert f"Saved{tmp_path / 'out[v2]'}." in shown(invoke("convert", source, "-q", "-o", tmp_path / "out[v2]"))
    overrides = [f"model.name={source}", "data.sources.0.split=test", f"output.dir={tmp_path / 'run[v2]'}"]
    plan = shown(runner.invoke(app, ["finetune", str(recipe), *overrides, "--dry-run"], env={"COLUMNS": "400"}))
    assert f"{tmp_path / 'run[v2]'}/model" in plan and "builtinenglish[test]isthetext" in plan


def test_a_long_path_in_a_message_stays_on_one_line(source, tmp_path):
    """Off a terminal rich wrapped messages at 80 columns, cutting a long path over two lines, which a log then shows
    (and a script greps) broken; a terminal wraps the line itself."""
    out = tmp_path / ("converted-" * 10)
    result = invoke("convert", source, "-q", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"Saved {out}. Load it with" in result.output
    recipe = tmp_path / ("recipe-" * 12 + ".yaml")
    result = invoke("recipe", "init", "-o", recipe)
    assert f"Wrote {recipe}; edit it, then run `linearize finetune {recipe}`\n" in result.output


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_reply_the_output_encoding_cannot_hold_is_printed_escaped(encoding, tmp_path):
    """stdout in an encoding without some of the reply's characters (a pipe on Windows, cp1252; a Latin-1 locale)
    stopped `generate` mid-stream with "'ascii' codec can't encode character": they are printed escaped."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import source_model

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"\u00e9\u4e2d{i}" for i in range(124)]  # é and a CJK character
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    source_model("llama").save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(tmp_path / "model")
    prompt = f"{words[9]} {words[40]}"
    command = ["generate", tmp_path / "model", prompt, "--no-chat", "--temperature", "1", "--seed", "0"]
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    done = subprocess.run(
        [sys.executable, "-m", "linearize", *map(str, command)], capture_output=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    assert "\\u4e2d" in done.stdout.decode(encoding)


def test_colon_words_in_paths_and_specs_are_not_printed_as_emoji(source, tmp_path):
    """Rich read ':x:' and ':a:' as emoji codes: a path 'run:x:1.yaml' was printed 'run❌1.yaml', a plan's source
    folder and an hf:NAME:CONFIG:SPLIT spec in an error alike. Text with colons is printed as it is."""
    recipe = tmp_path / "run:x:1.yaml"
    result = invoke("recipe", "init", "-o", recipe)
    assert result.exit_code == 0 and f"Wrote {recipe}; edit it" in result.output, result.output
    folder = tmp_path / "tiny:up:llama"
    folder.symlink_to(source)
    plan = runner.invoke(app, ["convert", str(folder), "--dry-run"], env={"COLUMNS": "400"})
    assert plan.exit_code == 0 and f"Conversion plan: {folder} -> liger" in plan.output, plan.output
    malformed = invoke("eval", source, "--text", "hf:a:b:c:d", "--passkey-contexts", "none")
    assert malformed.exit_code == 1 and "Error: --text 'hf:a:b:c:d': write hf:NAME" in malformed.output
