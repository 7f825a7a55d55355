"""Recipes: validation messages, overrides, templates and the fingerprint that guards resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from linearize.errors import LinearizeError
from linearize.methods import METHODS
from linearize.training.fingerprints import legacy_recipe_hash, recipe_hash, resumable_hashes
from linearize.training.recipe import (
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_recipe,
    resolved_yaml,
)
from linearize.training.recipe_template import recipe_template, write_recipe_template
from tests.tiny import converted_model, source_model

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "stages:\n  - kind: lora\n"


def test_minimal_recipe_fills_defaults():
    recipe = parse_recipe(MINIMAL)
    assert recipe.conversion.method == "liger"
    assert recipe.stages[0].trainable == ["lora"]
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert recipe.data.sources[0].builtin == "english"


def test_the_embedded_model_may_be_named_as_the_commands_name_it():
    # `convert`, `eval`, `bench` and `generate` take "embedded" for the embedded default; a recipe took it for a local
    # folder that does not exist
    named = parse_recipe(MINIMAL + "model: {name: embedded}\n")
    assert named.model.name is None
    assert recipe_hash(named) == recipe_hash(parse_recipe(MINIMAL))  # one run, however the recipe names it
    assert parse_recipe(MINIMAL, overrides=["model.name=embedded"]).model.name is None


def test_a_revision_of_the_embedded_model_is_refused():
    # the embedded model is one file shipped in a package, with no revisions: a revision was taken and ignored
    for model in ("{revision: v2}", "{name: embedded, revision: v2}"):
        with pytest.raises(RecipeError, match=r"\n  model\.revision applies to a Hub id .*the embedded model has none"):
            parse_recipe(MINIMAL + f"model: {model}\n")
    assert parse_recipe(MINIMAL + "model: {name: org/model, revision: v2}\n").model.revision == "v2"


def test_a_private_repo_without_a_push_is_refused():
    # output.private applies to the repo output.push_to_hub creates: without a push it was taken and ignored, where
    # `convert --private` without --push-to-hub is refused
    with pytest.raises(RecipeError, match=r"\n  output\.private makes the Hub repo .* nothing is pushed; set "):
        parse_recipe(MINIMAL + "output: {private: true}\n")
    assert parse_recipe(MINIMAL + "output: {private: true, push_to_hub: org/model}\n").output.private
    assert not parse_recipe(MINIMAL + "output: {private: false}\n").output.private  # what a resolved recipe writes


def test_a_home_folder_in_the_output_dir_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = parse_recipe(MINIMAL + "output: {dir: ~/runs/x}\n")  # YAML keeps '~' as it is
    assert recipe.output.dir == str(tmp_path / "runs" / "x")


def test_unknown_key_names_the_nearest_valid_key():
    text = MINIMAL + "training:\n  grad_acum: 4\n"
    with pytest.raises(RecipeError, match=r"training\.grad_acum: unknown key; did you mean 'grad_accum'\?"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match=r"stages\.0\.optimzer: unknown key; did you mean 'optimizer'\?"):
        parse_recipe("stages:\n  - kind: lora\n    optimzer: {lr: 1}\n")
    with pytest.raises(RecipeError, match=r"modle: unknown key; did you mean 'model'\?"):
        parse_recipe(MINIMAL + "modle: {}\n")
    # a key that belongs one section down: its place, rather than a look-alike here (max_steps for warmup_steps)
    for key, place in (("lr", "optimizer.lr"), ("warmup_steps", "schedule.warmup_steps")):
        with pytest.raises(RecipeError, match=rf"stages\.0\.{key}: unknown key; did you mean '{place}'\?"):
            parse_recipe(MINIMAL, overrides=[f"stages.0.{key}=3"])
    with pytest.raises(RecipeError, match=r"max_steps: unknown key; did you mean 'stages\.N\.max_steps'\?"):
        parse_recipe(MINIMAL + "max_steps: 3\n")


def test_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(MINIMAL + "training:\n  seed: 1\n  grad_accum: 2\n  seed: 3\n")
    with pytest.raises(RecipeError, match=r"twice\.yaml, line \d+, column 3: .*key 'seed' is written twice"):
        load_recipe(path)
    # a YAML merge may be overridden key by key, as YAML means it; an unhashable key stays YAML's error
    merged = parse_recipe("stages: [{kind: lora, optimizer: {<<: {name: muon, lr: 0.01}, lr: 0.005}}]\n")
    assert (merged.stages[0].optimizer.name, merged.stages[0].optimizer.lr) == ("muon", 0.005)
    with pytest.raises(RecipeError, match="malformed YAML: found unhashable key"):
        parse_recipe("? [a, b]\n: 1\n" + MINIMAL)


def test_wrong_type_names_the_field_path():
    with pytest.raises(RecipeError, match=r"stages\.0\.optimizer\.lr: .*'fast'"):
        parse_recipe("stages:\n  - kind: lora\n    optimizer: {lr: fast}\n")
    with pytest.raises(RecipeError, match=r"training\.grad_accum: .*greater than or equal to 1"):
        parse_recipe(MINIMAL + "training: {grad_accum: 0}\n")


def test_a_value_that_fits_no_type_of_its_key_is_named_by_the_key_once():
    # pydantic tries each type a key takes (held_out: a fraction or a count) and locates each failure at the type's
    # name, one level further down: the message named `data.held_out.float` and `data.held_out.int`, keys no recipe
    # has, on two lines
    for text, key, got in [
        (MINIMAL + "data: {held_out: 5%}\n", "data.held_out", "'5%'"),
        (MINIMAL + "data: {held_out: .nan}\n", "data.held_out", "nan"),
        (MINIMAL + "conversion: {method: still, topk: many}\n", "conversion.topk", "'many'"),
        (
            MINIMAL + "conversion: {softmax_layers: 'auto:2', selection: {spread: wide}}\n",
            "conversion.selection.spread",
            "'wide'",
        ),
        (MINIMAL + "lora: {target_modules: [q_proj, 3]}\n", "lora.target_modules.1", "3"),  # a list index stays
    ]:
        with pytest.raises(RecipeError) as error:
            parse_recipe(text)
        lines = str(error.value).splitlines()[1:]
        assert len(lines) == 1 and lines[0].startswith(f"  {key}: Input should be "), lines
        assert lines[0].endswith(f" (got {got})")


def test_a_number_or_a_bool_where_text_is_expected_is_told_to_be_quoted():
    # YAML reads a commit of digits alone, a version and yes/no unquoted as numbers and bools: the message said only
    # "Input should be a valid string"
    for text, key, what, got in [
        (MINIMAL + "model: {name: org/model, revision: 1234567}\n", "model.revision", "a number", "1234567"),
        (MINIMAL + "model: {name: 1.0}\n", "model.name", "a number", "1.0"),
        (MINIMAL + "output: {dir: yes}\n", "output.dir", "true", "True"),
        (MINIMAL + "lora: {target_modules: [q_proj, 3]}\n", "lora.target_modules.1", "a number", "3"),
    ]:
        with pytest.raises(RecipeError) as error:
            parse_recipe(text)
        line = str(error.value).splitlines()[1]
        assert line.startswith(f"  {key}: Input should be a valid string; YAML reads it unquoted as {what}"), line
        assert f"write it in quotes (in an override: {key}=\"'...'\") (got {got})" in line
    assert parse_recipe(MINIMAL + "model: {name: org/model, revision: '1234567'}\n").model.revision == "1234567"
    assert parse_recipe(MINIMAL, overrides=["model.name=org/model", "model.revision='1234567'"]).model.revision


def test_true_or_false_for_a_number_is_refused():
    # pydantic reads a bool as 1 or 0 for a number: `lr: true` would train at 1.0
    for key, text in [
        ("stages.0.optimizer.lr", "stages:\n  - kind: lora\n    optimizer: {lr: true}\n"),
        ("stages.0.max_steps", "stages:\n  - kind: lora\n    max_steps: true\n"),
        ("data.held_out", MINIMAL + "data: {held_out: true}\n"),
        ("data.sources.0.max_documents", MINIMAL + "data: {sources: [{builtin: english, max_documents: true}]}\n"),
        ("conversion.sinks", MINIMAL + "conversion: {method: liger, sinks: false}\n"),
    ]:
        with pytest.raises(RecipeError, match=rf"{re.escape(key)}: takes a number, not (true|false)"):
            parse_recipe(text)
    # a field that takes a bool or a number keeps both
    selection = "conversion: {method: liger, softmax_layers: 'auto:5', selection: {spread: %s}}\n"
    assert parse_recipe(MINIMAL + selection % "true").conversion.selection.spread is True
    assert parse_recipe(MINIMAL + selection % "4").conversion.selection.spread == 4


def test_an_infinite_or_nan_number_is_refused():
    # YAML reads .inf and .nan (and `1e400`, a string that parses as inf) as numbers: an infinite epochs crashed the
    # dry run and the run (once the model had loaded) with an OverflowError, an infinite lr trained to NaN
    for key, value in [
        ("stages.0.epochs", ".inf"),
        ("stages.0.optimizer.lr", ".inf"),
        ("stages.0.optimizer.lr", "1e400"),
        ("stages.0.mse_factor", ".nan"),
        ("training.max_grad_norm", ".inf"),
        ("lora.alpha", ".inf"),
        ("conversion.mix", ".nan"),
    ]:
        with pytest.raises(RecipeError, match=rf"{re.escape(key)}: .*finite number"):
            parse_recipe(MINIMAL, overrides=[f"{key}={value}"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - kind: lora\n training: [\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml, line \d+, column \d+: malformed YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist; `linearize recipe init`"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder; give the recipe's YAML file"):
        load_recipe(tmp_path)


def test_an_unreadable_recipe_file_is_named(tmp_path, unreadable_locked):
    (tmp_path / "locked.yaml").write_text(MINIMAL)
    with pytest.raises(RecipeError, match="cannot read recipe file '.*locked.yaml': Permission denied; check that it"):
        load_recipe(tmp_path / "locked.yaml")


def test_stages_are_required():
    with pytest.raises(RecipeError, match="stages"):
        parse_recipe("model: {dtype: float32}\n")


def test_distillation_belongs_to_lora_stages():
    with pytest.raises(RecipeError, match="kd_ratio applies to lora stages only"):
        parse_recipe("stages:\n  - {kind: attention_transfer, trainable: [lora], kd_ratio: 0.5}\n")
    with pytest.raises(RecipeError, match="kd_ratio"):
        parse_recipe("stages:\n  - {kind: lora, kd_ratio: 2}\n")
    assert parse_recipe("stages:\n  - {kind: lora, kd_ratio: 1}\n").stages[0].kd_ratio == 1


def test_the_transfer_loss_multiplier_belongs_to_attention_transfer_stages():
    # a lora stage's loss is the next-token loss: its mse_factor was accepted and had no effect
    with pytest.raises(RecipeError, match=r"stages\.0: mse_factor applies to attention_transfer stages only"):
        parse_recipe("stages:\n  - {kind: lora, mse_factor: 10}\n")
    transfer = "stages:\n  - {kind: attention_transfer, trainable: [lora], mse_factor: 10}\n"
    assert parse_recipe(transfer).stages[0].mse_factor == 10
    lora = parse_recipe(MINIMAL)
    assert parse_recipe(resolved_yaml(lora)) == lora  # a resolved recipe writes the default into every stage


def test_new_parameters_for_a_method_without_any():
    with pytest.raises(RecipeError, match="'liger' adds no parameters.*trainable: \\[lora\\]"):
        parse_recipe("stages:\n  - kind: attention_transfer\n")


def test_adds_parameters_matches_the_converted_layers():
    source_keys = set(source_model("llama").state_dict())
    for name, method in METHODS.items():
        new = set(converted_model("llama", name).state_dict()) - source_keys
        assert method.adds_parameters == bool(new), name


def test_softmax_layers_may_be_numbers():
    assert parse_recipe(MINIMAL + "conversion: {softmax_layers: 0}\n").conversion.softmax_layers == "0"
    assert parse_recipe(MINIMAL + "conversion: {softmax_layers: [0, 8]}\n").conversion.softmax_layers == "0,8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "conversion: {softmax_layers: auto:k}\n",
            "conversion.softmax_layers 'auto:k' is malformed: K in 'auto:K' is the number of layers",
        ),
        ("conversion: {selection: {scorer: loss}}\n", "selection applies to softmax_layers: auto:K"),
        (
            "conversion: {softmax_layers: auto:2, selection: {scorer: attn}}\n",
            "conversion.selection.scorer: .*'output'",
        ),
        (
            "conversion: {method: parallax, softmax_layers: auto:2}\n",
            "conversion.softmax_layers auto:K .* method 'parallax' without a window computes the original attention "
            "exactly until trained",
        ),
        (
            "conversion: {softmax_layers: auto:2, selection: {spread: 3}}\n",
            "conversion.selection.spread 3 spreads auto:2 over 3 stretches .* from 1 to K = 2",
        ),
        (
            "conversion: {softmax_layers: auto:2, selection: {after: attention_transfer}}\n",
            "stages.0 is a lora stage; put an attention_transfer stage first",
        ),
    ],
)
def test_auto_softmax_layers_are_checked(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(MINIMAL + text)


def test_parallax_with_a_window_is_not_exact_so_it_may_transfer_and_score_layers():
    stages = "stages:\n  - kind: attention_transfer\n  - kind: lora\n"
    with pytest.raises(RecipeError, match="stages.0: method 'parallax' without a window computes the original"):
        parse_recipe(stages + "conversion: {method: parallax}\n")
    recipe = parse_recipe(stages + "conversion: {method: parallax, window: 64, softmax_layers: auto:2}\n")
    assert recipe.stages[0].kind == "attention_transfer" and recipe.conversion.selection_request().k == 2
    # a window over the whole 512-token calibration window is exact until the probe trains: scored after it only
    whole = "conversion: {method: parallax, window: 512, softmax_layers: auto:2"
    with pytest.raises(RecipeError, match="conversion.window"):
        parse_recipe(stages + whole + "}\n")
    assert parse_recipe(stages + whole + ", selection: {after: attention_transfer}}\n").conversion.window == 512


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("every:0", "'every:0' is malformed: N in 'every:N' must be a positive integer"),
        ("0,x", r"'0,x' is malformed: 'x' is not a layer index; use a comma-separated list of layer indices \("),
        ("1,²", "'1,²' is malformed: '²' is not a layer index"),
        ("auto:²", "'auto:²' is malformed"),
    ],
)
def test_malformed_softmax_layers_are_refused_before_the_model_is_known(layers, message):
    with pytest.raises(RecipeError, match="conversion.softmax_layers " + message):
        parse_recipe(MINIMAL, overrides=[f"conversion.softmax_layers={layers}"])


def test_auto_softmax_layers_plan_every_layer_converted_until_scored():
    config = source_model("llama").config
    recipe = parse_recipe(MINIMAL + "conversion: {softmax_layers: auto:1, selection: {scorer: output, windows: 2}}\n")
    plan = recipe.conversion.plan(config, "tiny")
    assert plan.config.linearize["softmax_layers"] == [] and plan.selection is None
    request = recipe.conversion.selection_request()
    assert (request.k, request.scorer, request.windows, request.calibration) == (1, "output", 2, "builtin")
    assert request.spread is False
    spread = parse_recipe(MINIMAL + "conversion: {softmax_layers: auto:1, selection: {spread: true}}\n")
    assert spread.conversion.selection_request().spread is True
    with pytest.raises(LinearizeError, match="keeps more layers than the model has"):
        parse_recipe(MINIMAL + "conversion: {softmax_layers: auto:3}\n").conversion.plan(config, "tiny")


def test_liger_mix_reaches_the_conversion_plan():
    config = source_model("llama").config
    recipe = parse_recipe(MINIMAL + "conversion: {method: liger, mix: 0.75}\n")
    assert recipe.conversion.plan(config, "tiny").config.linearize["mix"] == 0.75
    assert parse_recipe(MINIMAL).conversion.plan(config, "tiny").config.linearize["mix"] == 0.5


def test_overrides():
    recipe = parse_recipe(
        MINIMAL + "  - kind: lora\n",
        overrides=["stages.1.optimizer.lr=3e-4", "training.grad_accum=2", "lora.target_modules=[q_proj, o_proj]"],
    )
    assert recipe.stages[1].optimizer.lr == 3e-4 and recipe.stages[0].optimizer.lr == 1e-3
    assert recipe.training.grad_accum == 2
    assert recipe.lora.target_modules == ["q_proj", "o_proj"]
    for bad, message in [
        ("lr", "is not key=value"),
        ("stages.5.epochs=1", "'5' is not an index of a 1-item list"),
        ("stages.0.kind.x=1", "is not a section"),
        (
            "data.sources.0.path=x.txt",
            r"does not write data\.sources \(its default applies\).*data\.sources=\[\.\.\.\]",
        ),
    ]:
        with pytest.raises(RecipeError, match=message):
            apply_overrides(yaml.safe_load(MINIMAL), [bad])


def test_an_override_with_a_misspelt_list_key_names_the_nearest_valid_key():
    with pytest.raises(RecipeError, match=r"stage: unknown key; did you mean 'stages'\?"):
        parse_recipe(MINIMAL, overrides=["stage.0.epochs=2"])


@pytest.mark.parametrize("method", list(METHODS))
def test_template_of_every_method_is_a_valid_recipe(method):
    text = recipe_template(method)
    assert text.startswith("# linearize fine-tuning recipe")
    recipe = parse_recipe(text)
    assert recipe.conversion.method == method
    own = {p.name for p in METHODS[method].settings.parameters()}
    for option in ("window", "sinks", "mix", "chunk_size", "topk"):  # the method's own options, and only those
        assert (f"  {option}: null" in text) == (option in own)
    if METHODS[method].exact_at_conversion:  # nothing to transfer: its new parameters train with LoRA
        assert [(s.kind, s.trainable) for s in recipe.stages] == [("lora", ["lora", "new"])]
    else:
        assert [s.kind for s in recipe.stages] == ["attention_transfer", "lora"]


def test_a_written_template_keeps_an_existing_file_unless_forced(tmp_path):
    path = write_recipe_template(tmp_path / "new" / "still.yaml", "still")
    assert load_recipe(path).conversion.method == "still" and [p.name for p in path.parent.iterdir()] == [path.name]
    path.write_text("# my edits")
    with pytest.raises(
        RecipeError, match=r"still.yaml' already exists; choose another path, or pass --force \(force=True\)"
    ):
        write_recipe_template(path, "liger")
    assert path.read_text() == "# my edits"
    assert load_recipe(write_recipe_template(path, "liger", force=True)).conversion.method == "liger"
    with pytest.raises(RecipeError, match="is a folder; give the recipe file's path"):
        write_recipe_template(tmp_path, "liger", force=True)


def test_resolved_yaml_round_trips_and_hash_ignores_the_output_folder():
    recipe = parse_recipe(MINIMAL)
    again = parse_recipe(resolved_yaml(recipe))
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)
    moved = parse_recipe(MINIMAL, overrides=["output.dir=elsewhere"])
    assert recipe_hash(moved) == recipe_hash(recipe)
    for override in ("stages.0.optimizer.lr=0.5", "stages.0.optimizer.new_name=muon"):
        assert recipe_hash(parse_recipe(MINIMAL, overrides=[override])) != recipe_hash(recipe)
    bookkeeping = ("training.eval_every=7", "training.keep_checkpoints=9", "training.gradient_checkpointing=true")
    for override in (*bookkeeping, "output.merge_lora=false"):
        assert recipe_hash(parse_recipe(MINIMAL, overrides=[override])) == recipe_hash(recipe)  # bookkeeping
        assert legacy_recipe_hash(parse_recipe(MINIMAL, overrides=[override])) != legacy_recipe_hash(recipe)
    # checkpoints recorded before gradient_checkpointing was bookkeeping resume with it as it was
    assert "e054cc1989a424d7" in resumable_hashes(recipe)
    checkpointing = parse_recipe(MINIMAL, overrides=["training.gradient_checkpointing=true"])
    assert "a223645a8e08d5dc" in resumable_hashes(checkpointing) and "e054cc1989a424d7" not in resumable_hashes(
        checkpointing
    )
    # the fingerprint checkpoints recorded before `conversion.selection` existed: their runs still resume
    assert legacy_recipe_hash(recipe) == "c3a9d4c269df6eb6"
    # and that of a scored selection from before `selection.spread` existed
    selected = parse_recipe(MINIMAL + "conversion: {softmax_layers: auto:1, selection: {scorer: restore}}\n")
    assert legacy_recipe_hash(selected) == "fbc80e033a8ca53e"
    spread = parse_recipe(
        MINIMAL + "conversion: {softmax_layers: auto:1, selection: {scorer: restore, spread: true}}\n"
    )
    assert recipe_hash(spread) != recipe_hash(selected)


@pytest.mark.parametrize(("given", "written"), [("8", "topk: 8\n"), ("8.0", "topk: 8\n"), ("0.125", "topk: 0.125\n")])
def test_resolved_yaml_writes_topk_as_the_user_meant_it(given, written):
    recipe = parse_recipe(MINIMAL, overrides=["conversion.method=still", f"conversion.topk={given}"])
    assert written in resolved_yaml(recipe)
    assert parse_recipe(resolved_yaml(recipe)) == recipe


@pytest.mark.parametrize(("given", "written"), [("4", "held_out: 4\n"), ("0.25", "held_out: 0.25\n")])
def test_resolved_yaml_writes_held_out_as_the_user_meant_it(given, written):
    """A count of documents stays a count: written as 4.0 (pydantic 2.7 and 2.8 did), the run folder's recipe read
    back as a fraction out of range, and --resume refused the run as another recipe's."""
    recipe = parse_recipe(MINIMAL, overrides=[f"data.held_out={given}"])
    assert written in resolved_yaml(recipe)
    assert parse_recipe(resolved_yaml(recipe)) == recipe


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.output.dir.startswith("runs/")


def test_paper_recipes_keep_the_published_lora_settings():
    """The 8B recipes follow the published code (docs/methods.md §1.7, §3.7): Liger's and STILL's both build peft's
    LoraConfig with r 8 and nothing else, so alpha and dropout are peft's defaults (8, 0), not LoLCATs' alpha 16."""
    for name in ("llama-3-8b-liger.yaml", "llama-3.1-8b-still.yaml"):
        lora = load_recipe(ROOT / "recipes" / name).lora
        assert (lora.r, lora.alpha, lora.dropout) == (8, 8, 0.0), name
    conversion = load_recipe(ROOT / "recipes" / "llama-3.1-8b-still.yaml").conversion
    assert (conversion.chunk_size, conversion.topk) == (64, 4)


def test_liger_paper_recipe_trains_the_window_the_released_checkpoints_saw():
    """The reference code's window reached the token and the 64 before it under the transformers release its
    checkpoints were trained with (docs/methods.md §1.3): 65 keys, which the recipe reproducing them must use."""
    conversion = load_recipe(ROOT / "recipes" / "llama-3-8b-liger.yaml").conversion
    assert (conversion.method, conversion.window, conversion.mix) == ("liger", 65, None)


def test_adamw_betas_outside_zero_to_one_are_refused_by_the_recipe():
    """torch refuses them too, but with a traceback once the model has loaded."""
    with pytest.raises(RecipeError, match=r"stages\.0\.optimizer\.betas\.1: Input should be less than 1 \(got 1\.5\)"):
        parse_recipe(MINIMAL, overrides=["stages.0.optimizer.betas=[0.9, 1.5]"])
    recipe = parse_recipe(MINIMAL, overrides=["stages.0.optimizer.betas=[0, 0.95]"])
    assert recipe.stages[0].optimizer.betas == (0, 0.95)
