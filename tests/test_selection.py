"""`--softmax-layers auto:K`: layer scores on calibration text, the K worst kept as softmax attention."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

import linearize.selection  # (importing linearize registers the converted model class with the Auto classes)
from linearize.cli import app
from linearize.convert import convert_model, keep_softmax_layers, plan_conversion
from linearize.errors import LinearizeError
from linearize.methods import method_settings
from linearize.publish import render_model_card
from linearize.selection import (
    LayerSelection,
    SelectionRequest,
    _mean_loss,
    depth_stretches,
    parse_auto,
    score_layers,
    select_layers,
)
from tests.tiny import _COMMON, tiny_tokenizer

LAYERS = 4
HARD = 2  # the layer made hard to linearize
SWA = {"window": 8, "sinks": 2}


def four_layers(seed: int = 0):
    """A tiny Llama whose layers attend to the token itself, sharply (a window reproduces that exactly), except
    layer HARD, which averages every earlier token (a window of 8 cannot)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "num_hidden_layers": LAYERS, "num_key_value_heads": 4}, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.q_proj.weight.copy_(0.0 if i == HARD else 500.0 * attn.k_proj.weight)
            attn.v_proj.weight.mul_(50.0 if i == HARD else 4.0)  # outputs that matter next to the residual stream
        model.model.norm.weight.mul_(30.0)  # confident predictions, which a changed layer moves
    return model.eval()


def sampled_windows(model, windows: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    """Text the model itself wrote: there any change to the model raises the expected loss (a KL divergence), so
    the loss scorer's ranking does not hang on what random weights happen to predict."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (windows, 1), generator=generator)
    with torch.no_grad():
        while ids.shape[1] < length:
            probs = model(ids, use_cache=False).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


@pytest.fixture(scope="module")
def windows():
    return sampled_windows(four_layers())


def all_converted(source, method="swa", **options):
    plan = plan_conversion(source.config, "tiny", method, "auto:1", **(options or SWA))
    return convert_model(source, plan.config), plan


@pytest.mark.parametrize("scorer", ["output", "loss", "restore"])
def test_the_layer_hard_to_linearize_is_chosen_and_scores_repeat(scorer, windows):
    source = four_layers()
    scores = score_layers(all_converted(source)[0], windows, scorer)
    assert max(range(LAYERS), key=scores.__getitem__) == HARD, scores
    easy = [s for i, s in enumerate(scores) if i != HARD]
    assert scores[HARD] > 10 * max(easy), scores
    assert score_layers(all_converted(four_layers())[0], windows, scorer) == scores  # same seed, same scores


def test_scoring_leaves_the_model_as_it_was(windows):
    source = four_layers()
    model, _ = all_converted(source)
    model.train()
    model.model.embed_tokens.eval()  # a caller's mix of modes, each put back as it was
    before = model(windows).logits
    for scorer in ("output", "loss", "restore"):
        score_layers(model, windows, scorer)
    assert model.training and torch.equal(model(windows).logits, before)
    assert [m.training for m in model.modules()] == [m is not model.model.embed_tokens for m in model.modules()]


def test_auto_0_is_no_kept_layer_and_auto_all_is_the_original(windows):
    source = four_layers()
    model, plan = all_converted(source)
    expected = model(windows).logits
    scores = score_layers(model, windows, "output")
    for k, reference in ((0, expected), (LAYERS, source(windows).logits)):
        selection = linearize.selection.LayerSelection(k, "output", scores, "sampled")
        kept_plan = plan_conversion(source.config, "tiny", "swa", selection, **SWA)
        kept = keep_softmax_layers(model, kept_plan.config)
        assert kept.config.linearize["softmax_layers"] == list(range(k))
        torch.testing.assert_close(kept(windows).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("num_layers", [1, 4, 7, 30, 31])
def test_depth_stretches_cover_every_layer_once_in_near_equal_runs(num_layers):
    for k in range(1, num_layers + 1):
        stretches = depth_stretches(num_layers, k)
        assert len(stretches) == k and [i for s in stretches for i in s] == list(range(num_layers))
        assert max(map(len, stretches)) - min(map(len, stretches)) <= 1


def test_spread_keeps_the_best_layer_of_each_stretch_of_the_depth():
    scores = [5.0, 4.0, 0.0, 0.0, 3.0, 3.0]
    assert LayerSelection(2, "loss", scores, "text").layers == [0, 1]  # the two best bunch at the bottom
    spread = LayerSelection(2, "loss", scores, "text", spread=True)
    assert spread.layers == [0, 4]  # stretches 0-2 and 3-5; the tie goes to the earlier layer
    assert LayerSelection(0, "loss", scores, "text", spread=True).layers == []
    assert LayerSelection(6, "loss", scores, "text", spread=True).layers == list(range(6))
    assert spread.rule == "the highest-scoring layer of each of 2 equal stretches of the depth"


def test_spread_over_fewer_stretches_adds_the_best_others():
    """spread = S < K: the best of each of S stretches, then the K - S highest-scoring layers not yet kept; S = K
    is `spread=True`, and no spread is the K highest."""
    scores = [1.0, 6.0, 0.0, 5.0, 4.0, 0.5, 3.0, 2.0]
    assert LayerSelection(3, "loss", scores, "text", spread=2).layers == [1, 3, 4]  # 1 of 0-3, 4 of 4-7, then 3
    three = LayerSelection(3, "loss", scores, "text", spread=3)
    assert three.layers == [1, 3, 6] == LayerSelection(3, "loss", scores, "text", spread=True).layers  # 0-1 2-4 5-7
    assert LayerSelection(3, "loss", scores, "text", spread=1).layers == [1, 3, 4]
    rule = LayerSelection(3, "loss", scores, "text", spread=2).rule
    assert rule == "the highest-scoring layer of each of 2 equal stretches of the depth, then the highest-scoring other"
    assert parse_auto("auto:3", spread=2).spread == 2
    for bad in (4, 0):  # named as given: convert's --spread-over, a recipe's key
        with pytest.raises(LinearizeError, match=f"^--spread-over {bad} spreads auto:3 .* must be from 1 to K = 3"):
            parse_auto("auto:3", spread=bad)
        key = "conversion.selection.spread"
        with pytest.raises(LinearizeError, match=f"^{key} {bad} spreads auto:3 .* must be from 1 to K = 3"):
            parse_auto("auto:3", spread=bad, spread_option=key)


def with_lora(model, seed: int = 0):
    """`model` under peft LoRA on q/k/v/o with random, non-zero adapters (as training leaves them)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def test_the_loss_scorer_sees_the_scored_layers_own_adapters_and_no_other(windows):
    """After a transfer stage that trained LoRA, a layer is scored with its adapters on; every other layer computes
    the original attention, adapters off."""
    trained = with_lora(all_converted(four_layers())[0])
    untouched = with_lora(all_converted(four_layers())[0])
    with torch.no_grad():
        for name, p in untouched.named_parameters():
            if "lora_B" in name and f"layers.{HARD}." in name:
                p.zero_()
    before, after = score_layers(untouched, windows, "loss"), score_layers(trained, windows, "loss")
    assert after[HARD] != before[HARD]
    assert [a for i, a in enumerate(after) if i != HARD] == [b for i, b in enumerate(before) if i != HARD]
    assert all(m._disable_adapters is False for m in trained.modules() if hasattr(m, "_disable_adapters"))


def test_the_restore_score_is_what_keeping_the_layer_gains(windows):
    """Each layer's `restore` score is the loss of the converted model (adapters on) minus its loss once that layer
    alone is kept as softmax attention, as `keep_softmax_layers` keeps it (its adapters dropped)."""
    source = four_layers()
    model = with_lora(all_converted(source)[0])
    scores = score_layers(model, windows, "restore")
    with torch.no_grad():
        converted = _mean_loss(model, windows, None)
        for layer in range(LAYERS):
            plan = plan_conversion(source.config, "tiny", "swa", str(layer), **SWA)
            kept = keep_softmax_layers(copy.deepcopy(model), plan.config)
            assert scores[layer] == pytest.approx(converted - _mean_loss(kept, windows, None), abs=1e-6)


def test_kept_layers_drop_what_their_adapters_learned_for_the_converted_attention(windows):
    source = four_layers()
    model = with_lora(all_converted(source)[0])
    selection = linearize.selection.LayerSelection(LAYERS, "loss", [0.0] * LAYERS, "sampled")
    kept = keep_softmax_layers(model, plan_conversion(source.config, "tiny", "swa", selection, **SWA).config)
    assert kept is model  # in place, adapters and all
    torch.testing.assert_close(kept(windows).logits, four_layers()(windows).logits, rtol=0, atol=0)


def test_selection_is_recorded_in_the_config_and_the_model_card(tmp_path):
    source = four_layers()
    model, _ = all_converted(source)
    selection = linearize.selection.LayerSelection(1, "loss", [0.1, 0.0, 2.5, 0.2], "sampled text")
    plan = plan_conversion(source.config, "tiny", "swa", selection, **SWA)
    keep_softmax_layers(model, plan.config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["linearize"]
    assert saved["softmax_layers"] == [2]
    assert saved["layer_selection"] == {
        "k": 1,
        "scorer": "loss",
        "scores": [0.1, 0.0, 2.5, 0.2],
        "calibration": "sampled text",
        "after": "conversion",
        "spread": False,
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the extra key loads without a warning about it
    assert loaded.config.settings.window == 8
    card = " ".join(render_model_card(tmp_path, "org/tiny-swa").split())
    assert "chosen by measurement (`--softmax-layers auto:1`)" in card and "| 2 | 2.5 | softmax |" in card
    assert "by how much converting it alone hurts (increase of the next-token loss" in card
    restored = {**saved, "layer_selection": {**saved["layer_selection"], "scorer": "restore"}}
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "linearize": restored}))
    card = " ".join(render_model_card(tmp_path, "org/tiny-swa").split())
    assert "by what restoring it alone gains (decrease of the next-token loss when the layer alone is restored" in card


@pytest.mark.parametrize(
    "spec,options,message",
    [
        ("auto:x", {}, "K in 'auto:K' is the number of layers to keep as softmax attention"),
        ("auto:-1", {}, "K in 'auto:K'"),
        ("auto:2", {"scorer": "attention"}, "unknown layer scorer 'attention'; choose one of: output, loss"),
    ],
)
def test_bad_requests_name_the_fix(spec, options, message):
    with pytest.raises(LinearizeError, match=message):
        parse_auto(spec, **options)


def test_more_layers_than_the_model_has_is_refused_from_the_config_alone():
    config = four_layers().config
    with pytest.raises(LinearizeError, match="keeps more layers than the model has \\(4\\): choose K from 0 to 4"):
        plan_conversion(config, "tiny", "swa", "auto:5", **SWA)
    assert plan_conversion(config, "tiny", "swa", "auto:4", **SWA).config.linearize["softmax_layers"] == []


def test_a_method_exact_at_conversion_is_refused_unless_a_window_makes_it_inexact(windows):
    with pytest.raises(LinearizeError, match="without a window computes the original attention exactly until trained"):
        SelectionRequest(1).check_method("parallax", method_settings("parallax"))
    SelectionRequest(1).check_method("parallax", method_settings("parallax", window=8))
    model, _ = all_converted(four_layers(), "parallax", window=8)
    assert min(score_layers(model, windows, "output")) > 0  # a window of 8 over 64 tokens: no longer the source


def test_calibration_text_too_short_names_the_fix(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    source = four_layers()
    request = parse_auto("auto:1", "output", calibration=str(short), windows=1)
    with pytest.raises(
        LinearizeError, match="short.txt' is too short to score layers on: 4 tokens, fewer than one window of 512"
    ):
        select_layers(all_converted(source)[0], tiny_tokenizer(), request)


def test_a_score_that_is_not_a_number_stops_the_choice(tmp_path, monkeypatch):
    """A NaN sorts anywhere and mis-ranks the finite scores too ([0.1, nan, 0.5, 0.2] kept layer 0 with auto:1)."""
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i % 100}" for i in range(600)))
    monkeypatch.setattr(linearize.selection, "score_layers", lambda *args: [0.1, float("nan"), 0.5, 0.2])
    request = parse_auto("auto:1", "loss", calibration=str(text), windows=1)
    with pytest.raises(LinearizeError, match=r"scored layer\(s\) 1 as nan: .*\(float16 is the usual cause\)"):
        select_layers(all_converted(four_layers())[0], tiny_tokenizer(), request)


@pytest.mark.parametrize(
    "method,exact,inexact",
    [
        ("swa", {"window": 512, "sinks": 4}, {"window": 511, "sinks": 4}),
        ("still", {"chunk_size": 256}, {"chunk_size": 255}),
        ("parallax", {"window": 512}, {"window": 511}),
    ],
)
def test_settings_exact_over_a_whole_calibration_window_are_refused(method, exact, inexact, windows):
    """A window of 512 keys (STILL: two chunks of 256) computes the original attention over every 512-token
    calibration window: every layer scored about 0 and rounding errors chose the kept ones."""
    request = SelectionRequest(1)
    with pytest.raises(LinearizeError, match="computes the original attention exactly over the first 512 tokens"):
        request.check_method(method, method_settings(method, **exact))
    request.check_method(method, method_settings(method, **inexact))
    # what training changes: Parallax's probe, not STILL's exact first chunks or swa's window
    after = "attention_transfer"
    if method == "parallax":
        request.check_method(method, method_settings(method, **exact), after=after)
    else:
        with pytest.raises(LinearizeError, match="rounding errors would choose"):
            request.check_method(method, method_settings(method, **exact), after=after)
    # on 64-token windows a window of 64 is exact: the scores the check spares users
    model, _ = all_converted(four_layers(), "swa", window=64, sinks=2)
    assert max(map(abs, score_layers(model, windows, "output"))) < 1e-12


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    four_layers().save_pretrained(root / "source")
    tiny_tokenizer().save_pretrained(root / "source")
    rng = random.Random(0)
    (root / "calibration.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(1200)))
    return root


def test_convert_auto_end_to_end(tiny_folder, tmp_path):
    args = ["convert", tiny_folder / "source", "--method", "swa", "--window", "8", "--sinks", "2"]
    args += ["--softmax-layers", "auto:1", "--layer-scorer", "output", "--calibration", tiny_folder / "calibration.txt"]
    args += ["--calibration-windows", "2"]
    dry = CliRunner().invoke(app, [str(a) for a in [*args, "--dry-run"]], env={"COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    shown = " ".join(dry.output.split())
    assert "Layer scores (output: relative error" in shown and "calibration.txt, 2 x 512 tokens" in shown
    assert "kept as softmax attention (the highest-scoring layer): 2" in shown and "layers 2 │ softmax" in shown
    assert not (tmp_path / "out").exists()

    done = CliRunner().invoke(app, [str(a) for a in [*args, "-o", tmp_path / "out"]])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["linearize"]
    scores = saved["layer_selection"]["scores"]
    assert len(scores) == LAYERS and saved["softmax_layers"] == [max(range(LAYERS), key=scores.__getitem__)]
    assert saved["layer_selection"]["calibration"].endswith("calibration.txt, 2 x 512 tokens")


def test_convert_auto_spread_keeps_one_layer_per_stretch(tiny_folder, tmp_path):
    args = ["convert", tiny_folder / "source", "--method", "swa", "--window", "8", "--sinks", "2"]
    args += ["--softmax-layers", "auto:2", "--spread-layers", "--layer-scorer", "output"]
    args += ["--calibration", tiny_folder / "calibration.txt", "--calibration-windows", "2", "-o", tmp_path / "out"]
    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["linearize"]
    scores = saved["layer_selection"]["scores"]
    best = [max(stretch, key=scores.__getitem__) for stretch in (range(0, 2), range(2, 4))]
    assert saved["layer_selection"]["spread"] is True and saved["softmax_layers"] == best
    card = " ".join(render_model_card(tmp_path / "out", "org/tiny-swa").split())
    assert "(`--softmax-layers auto:2 --spread-layers`)" in card
    assert "the highest-scoring layer of each of 2 equal stretches of the depth stayed softmax" in card
    args[args.index("--spread-layers")] = "--spread-over"
    args[args.index("--spread-over") + 1 : args.index("--spread-over") + 1] = ["1"]
    args[-1] = tmp_path / "over"
    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "over" / "config.json").read_text())["linearize"]
    scores = saved["layer_selection"]["scores"]
    best = max(range(LAYERS), key=scores.__getitem__)
    assert saved["layer_selection"]["spread"] == 1
    assert saved["softmax_layers"] == sorted(
        [best, max((i for i in range(LAYERS) if i != best), key=scores.__getitem__)]
    )
    card = " ".join(render_model_card(tmp_path / "over", "org/tiny-swa").split())
    assert "(`--softmax-layers auto:2 --spread-over 1`)" in card
    both = CliRunner().invoke(app, [str(a) for a in [*args[:-1], tmp_path / "both", "--spread-layers"]])
    assert both.exit_code == 1 and "--spread-layers is --spread-over K; give one of them" in both.output


def test_convert_auto_errors_before_loading(tiny_folder, tmp_path):
    out = tmp_path / "out"
    alone = CliRunner().invoke(
        app, ["convert", str(tiny_folder / "source"), "-o", str(out), "--layer-scorer", "output"]
    )
    assert alone.exit_code == 1 and "add --softmax-layers auto:K or drop them" in " ".join(alone.output.split())
    spread = CliRunner().invoke(app, ["convert", str(tiny_folder / "source"), "-o", str(out), "--spread-layers"])
    assert spread.exit_code == 1 and "--spread-over say how" in " ".join(spread.output.split())
    out = tmp_path / "out"
    base = ["convert", str(tiny_folder / "source"), "-o", str(out)]
    too_many = CliRunner().invoke(app, [*base, "--method", "swa", "--softmax-layers", "auto:9"])
    assert too_many.exit_code == 1 and "choose K from 0 to 4" in too_many.output
    wide = CliRunner().invoke(app, [*base, "--method", "swa", "--softmax-layers", "auto:2", "--spread-over", "3"])
    shown = " ".join(wide.output.split())
    assert wide.exit_code == 1 and "--spread-over 3 spreads auto:2 over 3 stretches" in shown, shown
    exact = CliRunner().invoke(app, [*base, "--method", "parallax", "--softmax-layers", "auto:1"])
    assert exact.exit_code == 1 and "every layer would score 0" in " ".join(exact.output.split())
    whole = CliRunner().invoke(app, [*base, "--method", "swa", "--window", "512", "--softmax-layers", "auto:1"])
    shown = " ".join(whole.output.split())
    assert whole.exit_code == 1 and "exactly over the first 512 tokens" in shown and "smaller --window" in shown
    assert not out.exists()


def test_a_malformed_calibration_source_is_named_as_given(tiny_folder, tmp_path):
    """An hf: calibration spec that is malformed was refused as `--text`, a flag `linearize eval` has and `convert`
    does not: the message names --calibration (a recipe, its key)."""
    args = ["convert", str(tiny_folder / "source"), "-m", "swa", "--window", "8", "--softmax-layers", "auto:1"]
    result = CliRunner().invoke(app, [*args, "--calibration", "hf:", "--dry-run"])
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "--calibration 'hf:': write hf:NAME" in shown and "--text" not in shown
    request = parse_auto("auto:1", calibration="hf:", windows=1)
    with pytest.raises(LinearizeError, match="^conversion.selection.calibration 'hf:': write hf:NAME"):
        linearize.selection.calibration_windows(request, tiny_tokenizer(), option="conversion.selection.calibration")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "output"])
def test_a_calibration_text_that_cannot_be_read_is_refused_before_the_weights_load(
    tiny_folder, tmp_path, monkeypatch, dry_run
):
    """A malformed hf: spec or a missing file was refused only once the source's weights had loaded (minutes for a
    large model): the spec alone shows it."""
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    args = ["convert", str(tiny_folder / "source"), "-m", "swa", "--window", "8", "--softmax-layers", "auto:1"]
    args += ["--dry-run"] if dry_run else ["-o", str(tmp_path / "out")]
    missing = tmp_path / "missing.txt"
    for spec, problem in [
        ("hf:", "--calibration 'hf:': write hf:NAME"),
        (str(missing), f"--calibration: data file {missing} not found"),
        (str(tmp_path / "*.jsonl"), "--calibration: no file matches"),
    ]:
        result = CliRunner().invoke(app, [*args, "--calibration", spec])
        shown = " ".join(result.output.split())
        assert result.exit_code == 1 and problem in shown, (spec, shown)
    assert not (tmp_path / "out").exists()
