"""The benchmark scripts run (tiny smoke mode), so they do not rot between GPU sessions."""

import ast
import importlib.util
import json
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from linearize.convert import save_model
from linearize.errors import LinearizeError
from linearize.sources import RECIPE_FILE
from linearize.training.recipe import load_recipe, resolved_yaml
from tests.tiny import converted_model, source_folder, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ops = ["gated_linear_attention", "sliding_window + sinks", "liger_attention", "liger_decode", "self_saliency"]
    ops += ["select_salient", "still_attention", "parallax_attention", "parallax_decode"]
    for op in ops:  # every op's correctness rows, all passing
        assert f"\n{op} " in result.stdout, op
    assert "FAIL" not in result.stdout and "0 problem(s)" in result.stdout
    for path in ["sdpa causal", "liger (ours)", "still (ours)", "parallax (ours)", "swa (ours)"]:
        assert f" {path} " in result.stdout, path
    assert "decode sweep" in result.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda path: path.name)
def test_help_of_a_benchmark_prints_its_docstring_as_written(path):
    """A backslash that ends a usage line (a shell continuation) must be doubled, or Python joins the lines."""
    source = path.read_text()
    written = source.split('"""')[1]
    assert ast.get_docstring(ast.parse(source), clean=False).count("\n") == written.count("\n")


def test_parallax_probe_order_help_gives_its_usage_and_what_it_measures(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["parallax_probe_order.py", "--help"])
    with pytest.raises(SystemExit):
        _benchmark("parallax_probe_order").main()
    shown = capsys.readouterr().out
    assert "python benchmarks/parallax_probe_order.py MODEL_FOLDER --text" in shown and "second-order share" in shown


@pytest.mark.parametrize("name", ["gpu_diagnose", "gpu_inputs"])
def test_a_helper_module_run_as_a_script_names_the_script_to_run(name):
    with pytest.raises(SystemExit, match="helpers of benchmarks/gpu_check.py"):
        runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"), run_name="__main__")


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_controls_train_like_the_recipe():
    quality = _benchmark("conversion_quality")
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-still.yaml", ["conversion.softmax_layers=0"])
    swa = quality.control_recipe(recipe, "swa-trained")
    assert (swa.conversion.method, swa.conversion.window, swa.conversion.sinks) == ("swa", 64, 4)
    assert swa.conversion.softmax_layers == "0"
    chosen = load_recipe(ROOT / "recipes" / "smollm2-135m-liger.yaml", ["conversion.softmax_layers=auto:2"])
    assert quality.control_recipe(chosen, "swa-trained", kept="3,17").conversion.softmax_layers == "3,17"
    assert [s.kind for s in swa.stages] == [s.kind for s in recipe.stages]
    assert all(s.trainable == ["lora"] for s in swa.stages)
    lora = quality.control_recipe(recipe, "lora")
    assert lora.conversion.method == "parallax"  # its zero probe is the original model exactly
    assert [s.kind for s in lora.stages] == ["lora"] and lora.stages[0].trainable == ["lora"]
    for control in (swa, lora):
        assert control.data == recipe.data and control.lora == recipe.lora and control.training == recipe.training
        assert control.output.dir != recipe.output.dir


def test_quality_tasks_read_the_given_folder(tmp_path):
    quality = _benchmark("conversion_quality")
    files = {task: tmp_path / f"{task}-items.jsonl" for task in quality.TASKS}
    for path in files.values():
        path.write_text("{}\n")
    folder = quality.task_folder(files, tmp_path / "tasks")
    for task, path in files.items():
        text = (folder / f"{task}.yaml").read_text()
        assert f"test: {path.resolve()}" in text and "data/" not in text
    assert (folder / "hellaswag_local.py").is_file()


def test_layer_selection_variants_keep_k_layers_each(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling import, as when run as a script
    selection = _benchmark("layer_selection")
    specs = selection.variant_layers(["auto-loss", "auto-output", "every", "random"], 5, 6, 30, seed=0)
    assert specs["auto-loss"] == specs["auto-output"] == "auto:5" and specs["every"] == "every:6"
    random_layers = [int(i) for i in specs["random"].split(",")]
    assert len(set(random_layers)) == 5 and all(0 <= i < 30 for i in random_layers)
    assert selection.variant_layers(["random"], 5, 6, 30, seed=0) == {"random": specs["random"]}  # seeded
    assert selection.variant_layers(["auto-restore-spread"], 5, 6, 30, seed=0) == {"auto-restore-spread": "auto:5"}
    with pytest.raises(SystemExit, match="unknown variant"):
        selection.variant_layers(["every:3"], 5, 6, 30, seed=0)


def test_layer_selection_variants_apply_to_a_recipe_that_selects(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    selection = _benchmark("layer_selection")
    recipe = ROOT / "recipes" / "smollm2-135m-liger-hybrid.yaml"  # auto:5, restore after transfer, spread: 4

    def conversion(name, spec):
        return load_recipe(recipe, selection.variant_overrides(name, spec)).conversion

    every = conversion("every", "every:6")
    assert (every.softmax_layers, every.selection) == ("every:6", None)
    loss = conversion("auto-loss", "auto:5")  # the recipe's own rule with another scorer
    assert (loss.selection.scorer, loss.selection.spread, loss.selection.after) == ("loss", 4, "attention_transfer")
    assert conversion("auto-output-spread", "auto:5").selection.spread is True


def test_gpu_diagnostics_locate_an_error_and_restore_a_forced_configuration():
    diagnose = _benchmark("gpu_diagnose")
    ref = torch.ones(1, 8, 2, 4)
    out = ref.clone()
    out[0, 5, 1] += 3.0  # one row wrong, in the third chunk of 2 tokens
    where = diagnose.locate(ref, out, chunk_size=2)
    assert "hold 100% of the error" in where and "chunk 0 / 1 / later 0.0e+00 / 0.0e+00 / " in where
    assert "worst h=1" in where and "worst rows t=5 h=1" in where

    kernel = types.SimpleNamespace(configs=["tuned", "other"], cache={("key",): "tuned"})
    with diagnose.forced(kernel, "other"):
        assert (kernel.configs, kernel.cache) == (["other"], {})
    assert (kernel.configs, kernel.cache) == (["tuned", "other"], {("key",): "tuned"})


@pytest.mark.parametrize("variant", ["parallax", "parallax-window"])
def test_parallax_probe_order_measures_each_layer(variant):
    """A small probe is mostly a query shift (second-order share well below 1); a larger one much less so. The
    measure reads the layer's window."""
    order = _benchmark("parallax_probe_order")
    model = converted_model("llama", variant, trained=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    shares = {}
    for size in (1e-3, 1.0):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.r_proj.weight.normal_(0, size, generator=torch.Generator().manual_seed(1))
        layers = order.captured_inputs(model, ids)
        assert len(layers) == len(model.model.layers)
        assert all(inputs["window"] == model.model.layers[0].self_attn.window for inputs in layers)
        rows = [order.probe_order(**inputs) for inputs in layers]
        assert all(row["effect"] > 0 and row["spread"] > 0 for row in rows)
        shares[size] = max(row["second_order"] for row in rows)
    assert shares[1e-3] < 0.01 < 0.2 < shares[1.0]


def test_parallax_probe_order_reads_a_saved_folder(tmp_path, monkeypatch, capsys):
    """The script end to end, through the loader a user's folder goes through."""
    order = _benchmark("parallax_probe_order")
    model = converted_model("llama", "parallax", trained=True)
    save_model(model, tiny_tokenizer(), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 100}" for i in range(200)))
    arguments = [str(tmp_path / "model"), "--text", str(text), "--context", "16"]
    monkeypatch.setattr(sys, "argv", ["parallax_probe_order", *arguments])
    order.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + len(model.model.layers) and rows[-1].startswith("| mean |")  # a header, layers, mean


def test_transfer_memory_counts_the_step_alone_not_an_earlier_peak():
    spike = bytearray(256 * 2**20)  # an earlier peak above the step's, as loading the model makes (zeroed: resident)
    del spike
    added = _benchmark("transfer_memory").added_peak_mib(lambda: bytearray(64 * 2**20))[1]
    assert 32 < added < 160


@pytest.mark.embedded
def test_speed_benchmark_converts_the_embedded_model():
    speed = _benchmark("speed_vs_original")
    models = speed.embedded_models(["swa", "parallax"])
    assert list(models) == ["original", "swa", "parallax"]
    embeddings = [models[name].model.embed_tokens.weight.data_ptr() for name in models]
    assert len(set(embeddings)) == 1  # one copy of the weights in memory


def test_quality_refuses_a_finished_model_that_another_recipe_trained(tmp_path):
    """An override such as training.seed=1 keeps output.dir: the model there is the other recipe's, whose numbers
    would be reported under this one's name."""
    quality = _benchmark("conversion_quality")
    path, run = ROOT / "recipes" / "smollm2-135m-parallax.yaml", tmp_path / "run"
    recipe = load_recipe(path, [f"output.dir={run}"])
    (run / "model").mkdir(parents=True)
    (run / "model" / RECIPE_FILE).write_text(resolved_yaml(recipe))
    with pytest.raises(SystemExit, match=r"another recipe \(training\.seed 0 -> 1\).*output\.dir="):
        quality.trained(load_recipe(path, [f"output.dir={run}", "training.seed=1"]))
    with pytest.raises(SystemExit, match=r"stages\.0\.trainable"):  # its controls are checked alike
        quality.trained(quality.control_recipe(recipe, "lora").model_copy(update={"output": recipe.output}))
    bookkeeping = load_recipe(path, [f"output.dir={run}", "training.eval_every=30"])
    quality.check_same_recipe(run / "model", bookkeeping)  # what a run computes is the same: its model serves


@pytest.mark.parametrize(
    "wrong, error",
    [
        ({"--arc": "missing.jsonl"}, "missing.jsonl does not exist"),
        ({"--text": "missing.txt"}, "missing.txt not found"),
        ({"--long-context": "40"}, "--long-context 40 must be a multiple of --block 16"),
        ({"stages=[{kind: attention_transfer, trainable: [lora]}]": None}, "no lora stage for the lora control"),
        ({"--text": "*.txt"}, "--text *.txt holds the recipe's training data:"),
    ],
    ids=["arc", "text", "block", "control", "trained-on"],
)
def test_quality_checks_its_inputs_before_training(tmp_path, monkeypatch, wrong, error):
    """Training the recipe and its controls takes hours: a mistyped file, a block that does not divide the long
    context, a control the recipe cannot make or a held-out text that it trains on must fail before it, not after
    (the block, after every evaluation, wrote no results; the text was never checked)."""
    quality = _benchmark("conversion_quality")
    monkeypatch.setattr(quality, "finetune", lambda *args, **kwargs: pytest.fail("trained before checking"))
    source_folder(tmp_path / "source")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: {tmp_path / 'source'}}}\nconversion: {{method: swa}}\n"
        "data: {sources: [{path: train.txt}]}\nstages: [{kind: lora, max_steps: 1}]\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    for name in ("held.txt", "train.txt"):
        (tmp_path / name).write_text(" ".join(f"w{i % 100}" for i in range(400)))
    for name in ("arc.jsonl", "hs.jsonl"):
        (tmp_path / name).write_text("{}\n")
    options = {"--recipe": recipe, "--text": "held.txt", "--arc": "arc.jsonl", "--hellaswag": "hs.jsonl"}
    options |= {"--context": "16", "--long-context": "32", "--block": "16", **wrong}
    monkeypatch.chdir(tmp_path)
    arguments = [str(x) for item in options.items() for x in item if x is not None]  # None: an override, no value
    monkeypatch.setattr(sys, "argv", ["conversion_quality.py", *arguments])
    with pytest.raises((SystemExit, LinearizeError), match=re.escape(error)):
        quality.main()


def test_transfer_memory_shows_why_a_measurement_failed(monkeypatch):
    """Each mode runs in a child process whose output is captured: its error must reach the user, not only 'returned
    non-zero exit status 1'."""
    memory = _benchmark("transfer_memory")
    failed = subprocess.CompletedProcess([], 1, "", "Traceback ...\nLinearizeError: unknown method 'lgr'; choose")
    monkeypatch.setattr(memory.subprocess, "run", lambda *args, **kwargs: failed)
    monkeypatch.setattr(sys, "argv", ["transfer_memory.py", "--method", "lgr"])
    with pytest.raises(SystemExit, match=r"(?s)forward measurement failed.*unknown method 'lgr'"):
        memory.main()


def test_quality_keeps_a_swa_recipes_model_beside_the_training_free_swa(tmp_path, monkeypatch):
    """A recipe of method swa (`linearize recipe init --method swa`) shares its label with the `swa` control: the
    training-free model took its column, under the recipe's training time."""
    quality = _benchmark("conversion_quality")
    source_folder(tmp_path / "source")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: {tmp_path / 'source'}}}\nconversion: {{method: swa, window: 8}}\n"
        "data: {sources: [{builtin: english}]}\nstages: [{kind: lora, max_steps: 1}]\n"
    )
    fine_tuned = converted_model("llama", "swa")
    monkeypatch.setattr(quality, "trained", lambda recipe: (fine_tuned, 12.0))
    models, minutes, _ = quality.models_to_compare(load_recipe(recipe), ["swa"])
    assert list(models) == ["swa-recipe", "original", "swa"] and minutes == {"swa-recipe": 12.0}
    assert models["swa-recipe"] is fine_tuned and models["swa"].config.linearize["window"] == 64


def test_results_go_into_a_json_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    """--json is written last, after minutes (a profile) or hours (training): a missing folder must not lose it."""
    quality = _benchmark("conversion_quality")
    quality.write_json(tmp_path / "new" / "quality.json", {"ppl": 1.5, "path": tmp_path})
    assert json.loads((tmp_path / "new" / "quality.json").read_text()) == {"ppl": 1.5, "path": str(tmp_path)}
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling import, as when run as a script
    profile = _benchmark("inference_profile")
    monkeypatch.setattr(profile, "embedded_models", lambda methods: {"original": converted_model("llama", "swa")})
    path = tmp_path / "out" / "profile.json"
    arguments = ["--methods", "", "--contexts", "8", "--repeats", "1", "--decode-tokens", "1", "--json", str(path)]
    monkeypatch.setattr(sys, "argv", ["inference_profile.py", *arguments])
    threads = torch.get_num_threads()
    try:
        profile.main()
    finally:
        torch.set_num_threads(threads)  # main() sets the process's (one, by default), as the script's own process
    assert set(json.loads(path.read_text())["results"]["8"]["original"]) == {"prefill", "decode"}


def test_quality_finds_a_held_out_dataset_split_that_the_recipe_trains_on():
    quality = _benchmark("conversion_quality")
    data = "data.sources=[{dataset: wikitext, subset: wikitext-2-raw-v1, split: train}, {builtin: english}]"
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-liger.yaml", [data])
    assert quality.trained_on(recipe, "hf:wikitext:wikitext-2-raw-v1:train") == [
        "dataset wikitext (wikitext-2-raw-v1) [train]"
    ]
    assert quality.trained_on(recipe, "hf:wikitext:wikitext-2-raw-v1:validation") == []
    assert quality.trained_on(recipe, "builtin") == []  # the test split, which no recipe may train on
