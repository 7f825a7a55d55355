"""`linearize eval`: passkey prompts and scoring, perplexity text sources, model pairing, the CLI end to end."""

import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from typer.testing import CliRunner

import linearize.comparison
from linearize import sources
from linearize.cli import app
from linearize.comparison import EMBEDDED, resolve_pair
from linearize.compat import CACHE_ARG, OUTPUT_CACHE_FIELD
from linearize.errors import LinearizeError
from linearize.evaluation import (
    evaluate_model,
    evaluate_models,
    perplexity_by_position,
    perplexity_of_windows,
    text_windows,
)
from linearize.passkey import FILLER, INTRO, NEEDLE, QUESTION, passkey_prompt, passkey_retrieval
from tests.tiny import CONFIGS, converted_model, model_from_config, source_model, tiny_tokenizer

runner = CliRunner()


def char_tokenizer():
    """One token per printable character (104 ids, within the tiny models' 128), built in memory."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "</s>", "<unk>"] + list(string.printable)
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class Histories(list):
    """The cache of `CopyModel`: the token history of each row."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        self[:] = [list(h) for h in self for _ in range(repeats)]


class CopyModel(torch.nn.Module):
    """A perfect induction head: after each position it predicts the token that followed the longest earlier match
    of the text ending there. Its cache is the token history, so it runs through the same cached calls as a model."""

    device = torch.device("cpu")

    def __init__(self, vocab: int = 128):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kwargs):
        histories = kwargs.get(CACHE_ARG) or Histories([[] for _ in input_ids])
        new = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(len(input_ids), new, self.vocab)
        for b, (history, ids) in enumerate(zip(histories, input_ids.tolist(), strict=True)):
            history += ids
            for row, t in enumerate(range(len(history) - new, len(history))):
                logits[b, row, self._next(history, t)] = 10.0
        return CausalLMOutputWithPast(logits=logits, **{OUTPUT_CACHE_FIELD: histories})

    @staticmethod
    def _next(history: list[int], t: int) -> int:
        best, best_length = 0, 0
        for j in range(t):
            n = 0
            while n <= j and n < 40 and history[j - n] == history[t - n]:
                n += 1
            if n > best_length:
                best, best_length = history[j + 1], n
        return best


class BlindModel(CopyModel):
    """Ignores its input: the same logits everywhere."""

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kwargs):
        new = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(len(input_ids), new, self.vocab)
        return CausalLMOutputWithPast(logits=logits, **{OUTPUT_CACHE_FIELD: Histories()})


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.mark.parametrize("context", [700, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_has_the_length_and_puts_the_needle_at_its_depth(tokenizer, context, depth):
    prompt = passkey_prompt(tokenizer, context, depth, "12345")
    filler = len(FILLER)  # one token per character
    assert context - filler < len(prompt.ids) <= context
    text = tokenizer.decode(prompt.ids)
    assert text.startswith(INTRO) and text.endswith(QUESTION)
    needle = NEEDLE.format(key="12345")
    filler_chars = len(text) - len(INTRO) - len(needle) - len(QUESTION)
    position = (text.index(needle) - len(INTRO)) / filler_chars
    assert abs(position - depth) <= filler / filler_chars / 2 + 1e-9  # rounded to a whole filler sentence


def word_tokenizer():
    """Words and punctuation as single tokens, a space joined to the word after it (GPT-2's pre-tokenizer, as most
    BPE tokenizers cut text): text ending in a space takes one token more alone than before a word. Built in memory
    over the passkey prompt's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = INTRO + FILLER * 2 + NEEDLE.format(key="12345") + QUESTION
    pieces = ["<pad>", "<s>", "</s>", "<unk>"] + sorted({piece for piece, _ in split.pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = split, decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_length_where_filler_tokens_merge(depth):
    tokenizer = word_tokenizer()
    alone = len(tokenizer(FILLER).input_ids)
    assert len(tokenizer(FILLER * 2).input_ids) < 2 * alone  # "again. " + "The": the space joins the word
    for context in (300, 1024, 2048):
        prompt = passkey_prompt(tokenizer, context, depth, "12345")
        # within a sentence of the filler (at most 6 tokens here), not short by a token per filler repeat
        assert context - 6 <= len(prompt.ids) <= context, (context, len(prompt.ids))
        text = tokenizer.decode(prompt.ids)
        assert text.startswith(INTRO) and text.endswith(QUESTION) and text.count("12345") == 2
        filler_chars = len(text) - len(INTRO) - len(NEEDLE.format(key="12345")) - len(QUESTION)
        position = (text.index("The pass key") - len(INTRO)) / filler_chars
        assert abs(position - depth) <= 25 / filler_chars  # a sentence


def test_passkey_prompt_errors(tokenizer):
    shortest = sum(map(len, (INTRO, NEEDLE.format(key="12345"), QUESTION, FILLER)))  # one token per character
    with pytest.raises(LinearizeError, match=f"too short: .* give a context of at least {shortest} tokens"):
        passkey_prompt(tokenizer, 300, 0.5, "12345")
    assert len(passkey_prompt(tokenizer, shortest, 0.5, "12345").ids) >= shortest
    with pytest.raises(LinearizeError, match="between 0 and 1"):
        passkey_prompt(tokenizer, 400, 1.5, "12345")


def test_a_model_that_copies_finds_every_key(tokenizer):
    result = passkey_retrieval(CopyModel(), tokenizer, [400, 700], depths=(0.0, 0.5, 1.0), trials=2, seed=3)
    for scores in result["contexts"].values():
        assert scores["greedy"] == 1.0 and scores["ranked"] == 1.0 and scores["trials"] == 6
        assert set(scores["by_depth"]) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trials": 0}, "at least one trial"),
        ({"depths": ()}, "at least one depth"),
        ({"distractors": 0}, "at least one distractor"),  # ranked: every trial a hit, whatever the model
        ({"distractors": 90_000}, "at most 89999 distractors"),  # more than the other 5-digit keys: endless
        ({"depths": (0.5, 1.5)}, "between 0 and 1"),
    ],
)
def test_passkey_retrieval_refuses_arguments_that_measure_nothing(tokenizer, options, message):
    with pytest.raises(LinearizeError, match=message):
        passkey_retrieval(BlindModel(), tokenizer, [400], **options)


def test_a_model_blind_to_its_context_scores_nothing(tokenizer):
    # equal likelihoods are a miss, and greedy decoding of constant logits never spells a key
    result = passkey_retrieval(BlindModel(), tokenizer, [400], depths=(0.0, 1.0), trials=3)
    assert result["contexts"][400]["greedy"] == 0.0 and result["contexts"][400]["ranked"] == 0.0


def test_passkey_runs_through_the_cache_of_converted_and_original_models(tokenizer):
    steps = []
    for model in (converted_model("llama", "liger"), source_model("llama")):
        result = passkey_retrieval(model, tokenizer, [400], depths=(0.0, 1.0), trials=1, step=lambda: steps.append(1))
        assert result["contexts"][400]["trials"] == 2
        assert 0.0 <= result["contexts"][400]["ranked"] <= 1.0
    assert len(steps) == 4


def test_text_sources(tokenizer, tmp_path, monkeypatch):
    import datasets

    # datasets read HF_DATASETS_CACHE when imported: the user's ~/.cache/huggingface gained a folder per run
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    builtin = text_windows("builtin", tokenizer, 64, 3)
    assert builtin.shape == (3, 64)
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 40)
    (tmp_path / "b.txt").write_text("delta epsilon " * 40)
    one = text_windows(str(tmp_path / "a.txt"), tokenizer, 32, 100)
    both = text_windows(str(tmp_path / "*.txt"), tokenizer, 32, 100)
    assert one.shape[0] == 680 // 32 and both.shape[0] == (680 + 1 + 560 + 1) // 32  # EOS after each document
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text("\n".join(json.dumps({"text": "zeta eta " * 30}) for _ in range(4)))
    hf = text_windows(f"hf:{tmp_path / 'ds'}", tokenizer, 64, 100)  # a local dataset folder, split "test"
    assert hf.shape == (4 * 271 // 64, 64) and list((tmp_path / "cache").iterdir())
    for context, windows in ((1, 3), (64, 0)):  # no window, or windows that predict nothing: not a nan perplexity
        with pytest.raises(LinearizeError, match="perplexity needs at least one window"):
            text_windows("builtin", tokenizer, context, windows)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("hf:", "hf:NAME"),
        ("hf:some-org/no-such-dataset", "offline"),
        ("no/such/file.txt", "not found"),
    ],
)
def test_text_source_errors(tokenizer, spec, message):
    with pytest.raises(LinearizeError, match=message):
        text_windows(spec, tokenizer, 64, 2)


def test_perplexity_of_windows_is_the_exponent_of_the_mean_next_token_loss():
    model = source_model("llama")
    ids = torch.randint(3, 128, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss  # the mean over the 3 x 63 next-token targets
    assert perplexity_of_windows(model, ids) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_by_position_splits_the_window_perplexity(tokenizer):
    model = source_model("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 10
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][: 2 * 96].view(2, 96)
    by_block = perplexity_by_position(model, ids, 32)
    assert len(by_block) == 3
    # 31, 32 and 32 targets: their geometric mean weighted by count is the perplexity of the whole windows
    combined = math.exp((31 * math.log(by_block[0]) + 32 * math.log(by_block[1]) + 32 * math.log(by_block[2])) / 95)
    assert combined == pytest.approx(perplexity_of_windows(model, ids), rel=1e-6)
    # the last block alone: positions 64..95 of each window, scored with the full context before them
    logits = model(input_ids=ids).logits[:, 63:-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 64:].reshape(-1))
    assert by_block[2] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of the block"):
        perplexity_by_position(model, ids, 40)


def _config_folder(path, **fields):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


def test_pairing(tmp_path):
    recorded = _config_folder(tmp_path / "conv", model_type="linearize", source_model=sources.EMBEDDED_ID)
    first, second = resolve_pair(str(recorded), None)
    assert first.label == "conv" and first.folder == recorded and second.source is None  # the embedded copy
    # the Hub's SmolLM2 (other weights than the embedded copy's, dequantised from Q4_1) is compared with itself
    fields = {"model_type": "linearize", "source_model": sources.EMBEDDED_ID}
    for weights, source in (("hub", sources.EMBEDDED_ID), ("embedded", None)):
        folder = _config_folder(tmp_path / weights, **fields, source_weights=weights)
        assert resolve_pair(str(folder), None)[1].source == source
    run_output = _config_folder(tmp_path / "liger-run" / "model", model_type="linearize", source_model="a/b")
    assert resolve_pair(str(run_output), None)[0].label == "liger-run/model"  # a fine-tuning run's output
    plain = _config_folder(tmp_path / "plain", model_type="llama")
    assert [s.label for s in resolve_pair(str(plain), None)] == ["plain"]
    assert resolve_pair(str(plain), EMBEDDED)[1].source is None
    unrecorded = _config_folder(tmp_path / "old", model_type="linearize")
    with pytest.raises(LinearizeError, match="--against"):
        resolve_pair(str(unrecorded), None)


def test_evaluate_models_evaluates_each_model_alike(tokenizer):
    models = {"original": source_model("llama"), "liger": converted_model("llama", "liger")}
    results = evaluate_models(models, tokenizer, "builtin", 64, 2)
    assert list(results) == ["original", "liger"]
    for label, model in models.items():
        assert results[label] == evaluate_model(model, tokenizer, "builtin", 64, 2)


def test_a_model_in_training_mode_is_measured_without_dropout_and_left_as_it_was(tokenizer):
    """A caller's fine-tuning loop evaluates its model between steps: the measurement is the eval-mode one (no
    dropout masks drawn, so two calls agree), and each module is left in the mode it had."""
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = model_from_config(config)
    expected = evaluate_model(model.eval(), tokenizer, "builtin", 32, 2, passkey_contexts=[400])
    model.train()
    model.lm_head.eval()  # a caller's mix of modes is kept too
    assert evaluate_model(model, tokenizer, "builtin", 32, 2, passkey_contexts=[400]) == expected
    assert model.training and model.model.layers[0].self_attn.training and not model.lm_head.training


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny source folder with the character tokenizer, and its Liger conversion through the CLI."""
    root = tmp_path_factory.mktemp("eval")
    source_model("llama").save_pretrained(root / "src")
    char_tokenizer().save_pretrained(root / "src")
    result = runner.invoke(app, ["convert", str(root / "src"), "--window", "8", "-o", str(root / "liger")])
    assert result.exit_code == 0, result.output
    return root / "src", root / "liger"


def test_eval_cli_prints_both_models_and_records_the_results(folders, tmp_path):
    src, liger = folders
    options = ["--context", "64", "--windows", "2", "--passkey-contexts", "400", "--depths", "0,1", "--trials", "1"]
    result = runner.invoke(
        app, ["eval", str(liger), "--against", str(src), *options, "--json", str(tmp_path / "e.json")]
    )
    assert result.exit_code == 0, result.output
    assert "liger" in result.stdout and "src" in result.stdout
    assert re.search(r"perplexity \(builtin, 2 x 64 tokens\)", result.stdout)
    assert "passkey @400 tokens, greedy" in result.stdout and "ranked vs 9" in result.stdout
    written = json.loads((tmp_path / "e.json").read_text())
    recorded = json.loads((liger / "linearize_eval.json").read_text())
    assert written == recorded and set(written["results"]) == {"liger", "src"}
    assert written["markdown"].startswith("| metric | liger | src |")
    assert written["results"]["liger"]["perplexity"]["value"] > 1
    assert written["settings"]["device"] == "cpu" and written["settings"]["dtype"] == "float32"  # auto, on a CPU


def test_eval_cli_says_perplexities_of_different_tokenizers_do_not_compare(folders, tmp_path):
    src, liger = folders
    other = tmp_path / "other"
    source_model("llama", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)  # words, where the source's tokenizer reads characters
    options = ["--context", "64", "--windows", "1", "--passkey-contexts", "none", "--no-record"]
    result = runner.invoke(app, ["eval", str(liger), "--against", str(other), *options])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "liger and other have different tokenizers" in shown and "do not compare" in shown
    assert "own tokenizer: not comparable" in result.stdout
    result = runner.invoke(app, ["eval", str(liger), "--against", str(src), *options])
    assert "different tokenizers" not in result.output and "not comparable" not in result.stdout


def test_eval_cli_errors(folders, tmp_path):
    src, liger = folders
    result = runner.invoke(app, ["eval", str(liger)])  # converted from a local folder: nothing recorded
    assert result.exit_code != 0 and "--against" in result.output
    result = runner.invoke(app, ["eval", str(src), "--passkey-contexts", "2x"])
    assert result.exit_code != 0 and "comma-separated" in result.output
    result = runner.invoke(app, ["eval", str(src), "--depths", "0,50", "--no-record"])
    assert result.exit_code != 0 and "--depths takes fractions between 0 and 1" in result.output
    assert "Evaluating" not in result.output  # before any model is measured
    result = runner.invoke(app, ["eval", str(src), "--passkey-contexts", "400,8", "--no-record"])
    assert result.exit_code != 0 and "passkey context 8 is too short" in result.output
    assert "Evaluating" not in result.output
    result = runner.invoke(app, ["eval", str(src), "--lm-eval-limit", "5", "--no-record"])
    assert result.exit_code != 0 and "apply to --lm-eval tasks" in result.output
    # lm-eval reads a limit below 1 as a fraction of the task: 0 would score no document, -3 nearly all
    result = runner.invoke(app, ["eval", str(src), "--lm-eval", "arc_easy", "--lm-eval-limit", "0"])
    assert result.exit_code == 2 and "--lm-eval-limit" in result.output
    (tmp_path / "short.txt").write_text("too short")
    options = ["--text", str(tmp_path / "short.txt"), "--passkey-contexts", "none", "--no-record"]
    result = runner.invoke(app, ["eval", str(src), *options])
    shown = " ".join(result.output.split())
    assert result.exit_code != 0 and f"the text {tmp_path / 'short.txt'} has 10 tokens, fewer than one window" in shown
    result = runner.invoke(app, ["eval", str(src), "--against", str(tmp_path / "nowhere"), *options])
    assert result.exit_code != 0 and "nowhere" in result.output and "Evaluating" not in result.output


def test_eval_cli_json_dash_writes_the_results_to_stdout(folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a file named "-" would land
    src, liger = folders
    options = ["--context", "64", "--windows", "1", "--passkey-contexts", "none", "--no-record", "--quiet"]
    result = runner.invoke(app, ["eval", str(liger), "--against", str(src), *options, "--json", "-"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert set(written["models"]) == {"liger", "src"} and "Evaluation" in result.stderr
    assert not (tmp_path / "-").exists()


def test_eval_cli_reads_the_text_before_any_model_loads(folders, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the text was read")

    monkeypatch.setattr("linearize.generation.load_for_inference", no_model)
    options = ["--passkey-contexts", "none", "--no-record"]
    result = runner.invoke(app, ["eval", str(folders[0]), "--text", str(tmp_path / "missing.txt"), *options])
    assert result.exit_code == 1 and "missing.txt not found" in result.output


def test_eval_cli_warns_where_the_model_folder_takes_no_record(folders, tmp_path, monkeypatch):
    """A read-only model store: the results are printed (and written to --json), the record is skipped with a
    warning, and a --json that names a folder is refused before any work."""
    src, liger = folders
    options = ["--against", str(src), "--context", "64", "--windows", "1", "--passkey-contexts", "none"]
    result = runner.invoke(app, ["eval", str(liger), *options, "--json", str(tmp_path)])
    assert result.exit_code != 0 and "is a folder; give a file path" in result.output
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["eval", str(liger), *options, "--json", str(tmp_path / "afile" / "e.json")])
    assert result.exit_code != 0 and "afile' is a file, not a folder" in result.output
    assert "Evaluat" not in result.output

    def read_only(spec, name, payload):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(linearize.comparison, "record", read_only)
    result = runner.invoke(app, ["eval", str(liger), *options, "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "Not recorded" in result.output and "Read-only file system" in result.output
    assert json.loads((tmp_path / "e.json").read_text())["results"]["liger"]["perplexity"]["value"] > 1


def test_batched_candidate_scores_equal_full_forwards(tokenizer):
    from linearize.passkey import _forward, _log_likelihoods

    model = converted_model("llama", "liger")
    prompt = tokenizer("The pass key is 123. The pass key is", return_tensors="pt").input_ids[0]
    candidates = [tokenizer(" " + k, add_special_tokens=False).input_ids for k in ("123", "456", "7")]
    with torch.inference_mode():
        first, cache = _forward(model, prompt, logits_to_keep=1)
        batched = _log_likelihoods(model, first[-1], cache, candidates)
        for candidate, score in zip(candidates, batched, strict=True):
            ids = torch.cat([prompt, torch.tensor(candidate)])
            logits = model(input_ids=ids[None], use_cache=False).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            assert score == pytest.approx(float(logits.gather(-1, torch.tensor(candidate)[:, None]).sum()), abs=1e-4)


def _eval_in_a_terminal(liger, src, *extra, **env):
    """Run `linearize eval` in a subprocess whose console rich treats as a terminal (FORCE_COLOR)."""
    options = ["--context", "64", "--windows", "2", "--passkey-contexts", "none", "--no-record"]
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"FORCE_COLOR": "1", "COLUMNS": "100", **env}
    command = [sys.executable, "-m", "linearize", "eval", str(liger), "--against", str(src), *options, *extra]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300, check=True)


def test_terminal_output_shows_progress_in_color_unless_no_color_or_quiet(folders):
    src, liger = folders
    colored = _eval_in_a_terminal(liger, src)
    assert "Evaluating liger" in colored.stderr and "\x1b[" in colored.stderr  # the bar, styled
    assert re.search(r"\x1b\[[0-9;]*3[0-9](;|m)", colored.stderr + colored.stdout)  # a foreground colour

    plain = _eval_in_a_terminal(liger, src, NO_COLOR="1")
    assert "Evaluating liger" in plain.stderr
    assert not re.search(r"\x1b\[[0-9;]*3[0-9](;|m)", plain.stderr + plain.stdout)

    quiet = _eval_in_a_terminal(liger, src, "--quiet")
    assert quiet.stderr == "" and "perplexity" in quiet.stdout


def test_a_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from linearize.comparison import write_json

    path = write_json(tmp_path / "linearize_eval.json", {"run": 1})
    real_write_text = Path.write_text

    def disk_full_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"run": 2, "rows": list(range(100))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_text_of_short_documents_fills_every_window_it_can(tokenizer, tmp_path):
    """Documents read up to the windows asked for, however short: 1000 records of 3 tokens each (EOS included) fill
    46 windows of 64 and one of 1024 (the reading stopped at 256-400 documents, short of that, and then said that the
    text had fewer tokens than one window)."""
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"w{i % 10}"}) + "\n" for i in range(1000)))
    assert text_windows(str(path), tokenizer, 64, 100).shape == (3000 // 64, 64)
    assert text_windows(str(path), tokenizer, 1024, 1).shape == (1, 1024)
    with pytest.raises(LinearizeError, match="has 3000 tokens, fewer than one window of 4096"):
        text_windows(str(path), tokenizer, 4096, 1)


def test_a_perplexity_too_large_for_a_float_is_inf():
    """A model whose logits blew up (a mean loss above 709) has an infinite perplexity: math.exp raised an
    OverflowError, a traceback after the whole measurement."""
    model = source_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    assert perplexity_of_windows(model, ids) == math.inf
    assert perplexity_by_position(model, ids, 16) == [math.inf, math.inf]


def test_a_record_of_numbers_that_are_not_finite_is_valid_json(tmp_path):
    """json.dumps writes NaN and Infinity, which no strict JSON reader (jq, JavaScript) takes: they are null."""
    from linearize.comparison import write_json

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    payload = {"results": {"m": {"perplexity": {"value": math.nan}, "runs": [1.5, math.inf, -math.inf]}}}
    written = json.loads(write_json(tmp_path / "e.json", payload).read_text(), parse_constant=strict)
    assert written == {"results": {"m": {"perplexity": {"value": None}, "runs": [1.5, None, None]}}}


def test_eval_cli_prints_names_and_paths_with_brackets_as_they_are(folders, tmp_path):
    """Rich read `[v2]` in a model's name or a path as a style and dropped it from the table and the messages."""
    src, liger = folders
    (tmp_path / "liger[v2]").symlink_to(liger)
    options = ["--context", "64", "--windows", "1", "--passkey-contexts", "none", "--no-record"]
    json_path = tmp_path / "e[v2].json"
    result = runner.invoke(
        app, ["eval", str(tmp_path / "liger[v2]"), "--against", str(src), *options, "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    assert "liger[v2]" in result.stdout and f"Wrote{json_path}" in "".join(result.output.split())


def test_eval_cli_out_of_memory_in_the_second_model_keeps_the_first(folders, tmp_path, monkeypatch):
    """The original (softmax) model is measured second, and its KV cache at long passkey contexts is what runs out of
    GPU memory: that was a traceback that lost MODEL's results too. They are printed and written, and the run fails,
    naming the model."""
    import linearize.evaluation

    src, liger = folders
    real_evaluate = linearize.evaluation.evaluate_model
    calls = []

    def out_of_memory_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(linearize.evaluation, "evaluate_model", out_of_memory_second)
    options = ["--context", "64", "--windows", "1", "--passkey-contexts", "none", "--no-record"]
    result = runner.invoke(
        app, ["eval", str(liger), "--against", str(src), *options, "--json", str(tmp_path / "e.json")]
    )
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "Error: out of memory while evaluating src" in shown, result.output
    assert "liger" in result.stdout and "perplexity" in result.stdout
    written = json.loads((tmp_path / "e.json").read_text())
    assert list(written["results"]) == ["liger"] and list(written["models"]) == ["liger"]
    calls[:] = [1]  # the next model measured is the second: MODEL itself runs out of memory
    result = runner.invoke(app, ["eval", str(liger), "--against", str(src), *options])
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "Error: out of memory while evaluating liger" in shown, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert "--passkey-contexts, or --dtype bfloat16" in shown  # float32, eval's default on a CPU: it would halve it
    calls[:] = [1]
    result = runner.invoke(app, ["eval", str(liger), "--against", str(src), *options, "--dtype", "bfloat16"])
    shown = " ".join(result.output.split())  # the advice was --dtype bfloat16, the dtype it ran out of memory in
    assert result.exit_code == 1 and shown.endswith("measure shorter --context and --passkey-contexts"), shown
