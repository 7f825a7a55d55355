"""`linearize finetune` end to end on a tiny model: stages, outputs, errors, torchrun (resume and the
run folder: test_checkpoint.py; the optimizers and schedules alone: test_optim.py; what a run refuses or
warns of before training: test_checks.py)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import linearize.sources  # (importing linearize registers the converted model class with the Auto classes)
from linearize.cli import app
from linearize.data import DataSource, PackedSequences
from linearize.training import trainer as trainer_module
from linearize.training.checkpoint import list_checkpoints
from linearize.training.checks import stage_steps
from linearize.training.data import DataConfig, FinetuneData, load_data
from linearize.training.distributed import World
from linearize.training.recipe import StageSection, TrainingSection
from tests.tiny import FAMILIES, attention_projections, source_folder, source_model, tiny_tokenizer
from tests.training.runs import RECIPE, instruction_file, invoke, metrics, process_env, trained, write_recipe


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])  # llama: every other test here
def test_each_family_fine_tunes(family, workspace, tmp_path, monkeypatch):
    """One attention-transfer step and one LoRA step on each family's tiny model, LoRA on its own projection names;
    the merged result loads back."""
    source_folder(tmp_path / family, family)
    # transformers picks a tokenizer class by model_type (Qwen2Tokenizer, ...), which reads the tiny word-level
    # vocabulary differently; a real checkpoint ships the tokenizer its class expects
    monkeypatch.setattr(linearize.sources, "_load_tokenizer", lambda *args: tiny_tokenizer())
    targets = ", ".join([*attention_projections(family), "o_proj"])
    text = (
        RECIPE.replace("{source}", str(tmp_path / family))
        .replace("target_modules: [q_proj, k_proj, v_proj, o_proj]", f"target_modules: [{targets}]")
        .replace("max_steps: 4", "max_steps: 1")
    )
    result = invoke("finetune", write_recipe(workspace, tmp_path, text))
    assert result.exit_code == 0, result.output
    records = metrics(tmp_path / "run")
    assert [r["kind"] for r in records if "mse" in r or "loss" in r] == ["attention_transfer", "lora"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.base_model_type == family


def test_two_stages_end_to_end(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = metrics(run)
    transfer = [r for r in records if r.get("kind") == "attention_transfer" and "mse" in r]
    lora = [r for r in records if r.get("kind") == "lora" and "loss" in r]
    assert [r["step"] for r in transfer] == [1, 2, 3, 4] and [r["step"] for r in lora] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in transfer + lora)
    assert [r["step"] for r in records if "eval_mse" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert [p.name for p in list_checkpoints(run)] == ["step-000006", "step-000008"]  # keep_checkpoints: 2
    assert (run / "linearize_recipe.yaml").is_file() and (run / "model" / "linearize_recipe.yaml").is_file()
    shutil.copytree(run / "checkpoints" / "step-000008", run / "checkpoints" / "step-000008.bak")  # a user's copy
    assert [p.name for p in list_checkpoints(run)] == ["step-000006", "step-000008"]

    # the saved model is a converted model folder with LoRA merged: it loads and generates with no peft
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    # merged weights differ from the untrained conversion exactly where adapters were
    source = AutoModelForCausalLM.from_pretrained(workspace / "source")
    trained, original = model.state_dict(), source.state_dict()
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_attention_transfer_fits_the_teacher(workspace, tmp_path):
    """Five epochs over six sequences: the student's attention MSE falls well below where it started. (A random
    tiny model's attention has nothing to generalise from, so this checks the fit, not held-out text.)"""
    recipe = write_recipe(workspace, tmp_path)
    stages = "stages=[{kind: attention_transfer, trainable: [lora], epochs: 5, optimizer: {lr: 0.01}}]"
    data = ["data.sources.0.max_documents=2", "data.held_out=0", "training.grad_accum=1"]
    result = invoke("finetune", recipe, stages, *data)
    assert result.exit_code == 0, result.output
    mse = [r["mse"] for r in metrics(tmp_path / "run") if "mse" in r]
    assert len(mse) == 30
    first, last = sum(mse[:6]) / 6, sum(mse[-6:]) / 6
    assert last < 0.75 * first, mse


def test_distillation_moves_the_student_toward_the_original(workspace, tmp_path):
    """A lora stage with kd_ratio 1 trains on the KL divergence to the original model alone: it falls."""
    recipe = write_recipe(workspace, tmp_path)
    stages = "stages=[{kind: lora, kd_ratio: 1.0, epochs: 5, optimizer: {lr: 0.01}}]"
    data = ["data.sources.0.max_documents=2", "data.held_out=0", "training.grad_accum=1"]
    result = invoke("finetune", recipe, stages, *data, "--dry-run")
    assert result.exit_code == 0 and "distils the original (kd_ratio 1)" in result.output, result.output
    result = invoke("finetune", recipe, stages, *data)
    assert result.exit_code == 0, result.output
    steps = [r for r in metrics(tmp_path / "run") if "loss" in r]
    kl = [r["loss"] for r in steps]
    assert len(kl) == 30 and all(value >= 0 for value in kl)
    assert sum(kl[-6:]) / 6 < 0.5 * sum(kl[:6]) / 6, kl
    # the next-token loss, which the held-out eval_loss measures, is logged apart: the loss is the KL here
    assert all(r["ce"] > r["loss"] for r in steps), steps
    assert "(next-token " in result.output


def test_unmerged_lora_keeps_the_adapter(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe, "output.merge_lora=false", "stages.0.max_steps=1", "stages.1.max_steps=1", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: stages.1.schedule.warmup_steps (1) is not below" in " ".join(result.output.split())  # quiet too
    from peft import AutoPeftModelForCausalLM, PeftModel

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    source = AutoModelForCausalLM.from_pretrained(workspace / "source")
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tmp_path / "run" / "model")
    merged = invoke(
        "finetune", recipe, "output.dir=" + str(tmp_path / "merged"), "stages.0.max_steps=1", "stages.1.max_steps=1"
    )
    assert merged.exit_code == 0, merged.output
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)  # base + adapter = merged
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")  # the base found by its path
        torch.testing.assert_close(auto(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # resumed once finished, with merge_lora: true (bookkeeping): model/ is merged, and no adapter names it its base
    remerged = invoke("finetune", recipe, "stages.0.max_steps=1", "stages.1.max_steps=1", "--resume", "-q")
    assert remerged.exit_code == 0, remerged.output
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_last_line_says_where_the_model_is_and_what_to_run_next(workspace, tmp_path):
    """--quiet printed nothing at all, not even the model folder a script goes on with (convert -q and push -q print
    their result); without it the run ended on `Saved RUN/model` alone. The folder is now the quiet run's output,
    and the summary names the commands that use it, or, with the LoRA kept apart, how to load the two."""
    recipe = write_recipe(workspace, tmp_path)
    short = ["stages.0.max_steps=1", "stages.1.max_steps=1", "stages.1.schedule.warmup_steps=0"]
    model = tmp_path / "run" / "model"
    result = invoke("finetune", recipe, *short, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{model}\n"  # model=$(linearize finetune recipe.yaml -q)
    result = invoke("finetune", recipe, *short, "--resume")  # the finished run: saved again, nothing trained
    assert result.exit_code == 0 and result.stdout == "", result.output
    shown = " ".join(result.stderr.split())
    assert f"Saved {model}." in shown and f"`linearize eval {model} --against {workspace / 'source'}`" in shown
    assert f"`linearize generate {model} PROMPT`" in shown and f"`linearize push {model} ORG/NAME`" in shown
    result = invoke("finetune", recipe, *short, "--resume", "output.merge_lora=false")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stderr.split())
    assert f"Saved {model} without its LoRA, the adapter in {tmp_path / 'run' / 'adapter'}" in shown
    assert f"AutoPeftModelForCausalLM.from_pretrained('{tmp_path / 'run' / 'adapter'}')" in shown


def test_the_saved_model_holds_its_recipe_as_soon_as_it_is_in_place(workspace, tmp_path, monkeypatch):
    """model/ appears whole: a run stopped right after moving it into place leaves it with its recipe."""
    real_save_model = trainer_module.save_model

    def killed_once_saved(*args, **kwargs):
        real_save_model(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_model", killed_once_saved)
    result = invoke("finetune", write_recipe(workspace, tmp_path), "stages.0.max_steps=1", "stages.1.max_steps=1")
    assert result.exit_code == 130
    assert "kind: attention_transfer" in (tmp_path / "run" / "model" / "linearize_recipe.yaml").read_text()


def test_a_run_stopped_while_saving_its_adapter_leaves_none_half_written(workspace, tmp_path, monkeypatch):
    from peft import PeftModel

    def killed_while_writing(self, folder, **kwargs):
        (Path(folder) / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftModel, "save_pretrained", killed_while_writing)
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe, "output.merge_lora=false", "stages.0.max_steps=1", "stages.1.max_steps=1")
    assert result.exit_code == 130 and not (tmp_path / "run" / "adapter").exists()


def test_accumulated_micro_batches_weigh_by_their_trained_tokens(workspace, tmp_path, monkeypatch):
    """Instruction packs train varying numbers of tokens: two micro-batches of one pack accumulate the gradient
    that one micro-batch of both packs computes (the mean over the step's tokens, not the mean of two means)."""
    data = instruction_file(tmp_path / "alpaca.jsonl")  # the first step's two packs train 7 and 2 tokens (below)
    gradients = []

    def spy(params, max_norm):
        gradients.append(torch.cat([p.grad.flatten() for p in params]).clone())
        return torch.tensor(0.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    common = [f"data.sources=[{{path: {data}}}]", "data.held_out=0", "stages=[{kind: lora, max_steps: 1}]"]
    for i, batching in enumerate((["training.grad_accum=2"], ["training.micro_batch_size=2", "training.grad_accum=1"])):
        (tmp_path / str(i)).mkdir()
        recipe = write_recipe(workspace, tmp_path / str(i))
        result = invoke("finetune", recipe, *common, *batching, "training.max_grad_norm=1000")
        assert result.exit_code == 0, result.output
    accumulated, together = gradients
    packs = load_data(DataConfig(sources=[DataSource(path=str(data))], seq_len=32, held_out=0), tiny_tokenizer())
    first_step = trainer_module.torch.randperm(len(packs.train), generator=torch.Generator().manual_seed(0))[:2]
    assert (packs.train.labels[first_step, 1:] != -100).sum(1).tolist() == [7, 2]  # the order of stage 0, epoch 0
    torch.testing.assert_close(accumulated, together, rtol=1e-4, atol=1e-7)

    # packs of prompt alone (no trained token): their loss is zero, not 0 / 0, and the user is told even with -q
    (tmp_path / "short").mkdir()
    recipe = write_recipe(workspace, tmp_path / "short")
    short = [f"data.sources=[{{path: {data}}}]", "data.seq_len=8", "data.held_out=4", "training.grad_accum=4"]
    result = invoke("finetune", recipe, *short, "stages=[{kind: lora, max_steps: 6}]", "-q")
    assert result.exit_code == 0, result.output
    assert "training packs hold no trained token (prompts longer than a pack?)" in " ".join(result.output.split())
    records = metrics(tmp_path / "short" / "run")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(math.isfinite(r["eval_loss"]) for r in records if "eval_loss" in r)


def test_packs_without_a_trained_token_add_nothing_in_float16_however_large_the_logits(workspace, tmp_path):
    """A micro-batch without a trained token adds a zero loss: in float16 the sum of its logits, which that zero
    was made from, overflows (a real model's logits share an offset: 512 x 49K of them overflow at a mean of
    0.003), and zero times infinity stopped the run at once, 'the loss became nan ... lower the lr'."""
    source = source_model("llama")
    with torch.no_grad():  # tied: every token's embedding and output row share one large component, logits ~ 96
        source.model.embed_tokens.weight[:, 0] = 6.0
        source.model.norm.weight[0] = 2.0
    source.save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    data = instruction_file(tmp_path / "alpaca.jsonl")
    recipe = write_recipe(workspace, tmp_path)
    result = invoke(
        "finetune", recipe, f"model={{name: {tmp_path / 'source'}, dtype: float16}}",
        f"data.sources=[{{path: {data}}}]", "data.seq_len=8", "data.held_out=4", "training.grad_accum=4",
        "training.eval_batches=16", "stages=[{kind: lora, max_steps: 2, optimizer: {lr: 1.0e-6}}]", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "training packs hold no trained token" in " ".join(result.output.split())
    records = metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [math.isfinite(r["eval_loss"]) for r in records if "eval_loss" in r] == [True, True]


def test_the_held_out_transfer_mse_is_the_mean_over_its_rows_however_they_fall_into_micro_batches(workspace, tmp_path):
    """Six held-out packs as micro-batches of 4 and 2 give the MSE that six micro-batches of one give: each row
    weighs the same (not each micro-batch)."""
    stage = "stages=[{kind: attention_transfer, trainable: [lora], max_steps: 1}]"
    evals = []
    four_and_two, ones = ["training.micro_batch_size=4", "training.eval_batches=2"], ["training.eval_batches=6"]
    for i, batching in enumerate((four_and_two, ones)):
        (tmp_path / str(i)).mkdir()
        recipe = write_recipe(workspace, tmp_path / str(i))
        result = invoke("finetune", recipe, stage, *batching)
        assert result.exit_code == 0, result.output
        evals.append(next(r["eval_mse"] for r in metrics(tmp_path / str(i) / "run") if "eval_mse" in r))
    assert "held out: 2 documents -> 6 packs" in " ".join(result.output.split())
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)


def test_the_dry_run_under_torchrun_prints_its_plan_once(workspace, tmp_path, monkeypatch):
    recipe = write_recipe(workspace, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = invoke("finetune", recipe, "--dry-run")
    assert result.exit_code == 0 and result.output == ""
    monkeypatch.setenv("RANK", "0")
    assert "2 process(es)" in invoke("finetune", recipe, "--dry-run").output


BARS = """\
import os, sys
from transformers.utils import logging
from linearize import sources
from linearize.training.recipe import load_recipe
from linearize.training.trainer import finetune
load_model = sources.load_model
def load_reporting(*args, **kwargs):
    print(f"process {os.environ['RANK']}: bars {logging.is_progress_bar_enabled()}")
    return load_model(*args, **kwargs)
sources.load_model = load_reporting
finetune(load_recipe(sys.argv[1], ["stages.0.max_steps=1", "stages.1.max_steps=1"]))
"""


def test_under_torchrun_the_main_process_alone_shows_progress_bars(workspace, tmp_path):
    """Every process loads (and saves) weights, and each drew transformers' bars ("Loading weights") into the one
    terminal or log torchrun shares: the main process speaks for the run, its bars included."""
    script = tmp_path / "bars.py"
    script.write_text(BARS)
    env = process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run([*command, str(write_recipe(workspace, tmp_path))], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.splitlines()) == ["process 0: bars True", "process 1: bars False"]


@pytest.mark.parametrize(("rank", "quiet"), [("0", ["-q"]), ("1", [])], ids=["quiet", "torchrun-process-1"])
def test_a_dry_run_shows_its_spinner_once_and_not_under_quiet(rank, quiet, workspace, tmp_path, monkeypatch):
    """The dry run's 'Reading the data' spinner ignored --quiet, and under torchrun every process drew its own on
    the one terminal; only the main process, unless quiet, shows it."""
    import io

    from rich.console import Console

    import linearize.cli.common

    terminal = Console(file=io.StringIO(), force_terminal=True, emoji=False)
    monkeypatch.setattr(linearize.cli.common, "console", terminal)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    result = invoke("finetune", write_recipe(workspace, tmp_path), "--dry-run", *quiet)
    assert result.exit_code == 0, result.output
    assert terminal.file.getvalue() == ""


def test_help_says_what_a_resumed_run_may_change():
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"})
    assert "eval_batches, checkpoint_every, keep_checkpoints, gradient_checkpointing and output.merge_lora may" in (
        " ".join(result.output.split())
    )


def test_dry_run_prints_the_plan_and_writes_nothing(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    for text in ("attention_transfer", "trains lora", "layers 0-1", "liger", "LoRA merged"):
        assert text in result.output
    assert not (tmp_path / "run").exists()
    selection = "conversion.selection={scorer: restore, after: attention_transfer, spread: true}"
    optimizer = ["stages.0.optimizer.new_lr=0.0002", "stages.0.optimizer.new_name=muon"]
    overrides = ["conversion.softmax_layers=auto:2", selection, *optimizer]
    args = [str(a) for a in ("finetune", recipe, "--dry-run", *overrides, "data.sources=[{builtin: english}]")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "the highest-scoring layer of each of 2 equal stretches of the depth (restore, on builtin)" in shown
    assert "chosen after the attention transfer" in shown
    assert "│ method │ liger {'window': 8, 'sinks': 0, 'mix': 0.5" in shown  # as convert --dry-run shows them
    assert "adamw lr 0.01 (added parameters muon lr 0.0002)" in shown
    assert "builtin english [train]; packs of" in shown  # a label in brackets is text, not rich markup
    result = invoke("finetune", recipe, "--dry-run", f"data.sources=[{{path: {tmp_path / 'nothing' / '*.txt'}}}]")
    assert result.exit_code == 1 and "no file matches" in result.output
    result = invoke("finetune", recipe, "--dry-run", "lora.target_modules=[foo_proj]")
    assert result.exit_code == 1 and "name no layer of this model; its linear layers are" in result.output
    result = invoke("finetune", recipe, "--dry-run", "lora.target_modules=[up_proj, down_proj]")
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "stages.0 (attention_transfer) has nothing to train: it trains the" in shown
    result = invoke("finetune", recipe, "--dry-run", "lora.target_modules=[q_proj, foo_proj]")
    assert result.exit_code == 0 and "['foo_proj'] match no layer" in " ".join(result.output.split())
    result = CliRunner().invoke(
        app, ["finetune", str(recipe), "--dry-run", "stages.1.max_steps=1"], env={"COLUMNS": "300"}
    )
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "stages.1.schedule.warmup_steps (1) is not below the stage's 1 optimizer" in shown
    result = CliRunner().invoke(
        app, ["finetune", str(recipe), "--dry-run", "data.seq_len=600", "data.held_out=0"], env={"COLUMNS": "300"}
    )
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "data.seq_len (600) is more tokens than the model reads (512" in shown
    # the data as the run reads it: packs, steps of a stage given in epochs, and what the run would refuse
    result = CliRunner().invoke(app, ["finetune", str(recipe), "--dry-run", "stages.1.max_steps=null"])
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "train: 10 documents -> 31 packs of 32 tokens" in shown
    assert "15 steps (1 epoch)" in shown  # 31 packs, 2 a step
    for bad, message in (
        ("data.held_out=12", "has 12 documents, all held out"),
        ("training.grad_accum=64", "fewer than one optimizer step uses"),
    ):
        result = invoke("finetune", recipe, "--dry-run", "stages.1.max_steps=null", "training.micro_batch_size=8", bad)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), bad
    push = ["output.push_to_hub=me/tiny", "output.private=true"]
    result = CliRunner().invoke(app, ["finetune", str(recipe), "--dry-run", *push], env={"COLUMNS": "300"})
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "to me/tiny (private), once saved" in shown
    assert "the push would fail now: the Hugging Face Hub is switched off" in shown  # tests run offline
    result = invoke("finetune", recipe, "--dry-run", *push, "output.merge_lora=false")
    assert result.exit_code == 1 and "holds the model without its LoRA adapter" in " ".join(result.output.split())


def test_recipe_commands(tmp_path):
    result = invoke("recipe", "init", "--method", "liger")
    assert result.exit_code == 0 and "kind: attention_transfer" in result.output
    path = tmp_path / "r.yaml"
    path.write_text(result.output)
    result = invoke("recipe", "validate", path, "--show")
    assert result.exit_code == 0 and "OK" in result.output and "micro_batch_size: 1" in result.output
    result = invoke("recipe", "validate", path, "training.grad_acum=2")
    assert result.exit_code == 1 and "did you mean 'grad_accum'" in result.output


def test_the_librarys_finetune_leaves_the_callers_progress_bars_and_random_state_alone(workspace, tmp_path):
    """`finetune(recipe, quiet=True)` from a script or notebook: its seed and its hidden bars are the run's alone,
    whether the run completes or fails."""
    import random

    import numpy as np
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from linearize.training.recipe import load_recipe

    def caller_state():
        return (
            transformers_logging.is_progress_bar_enabled(),
            are_progress_bars_disabled(),
            torch.get_rng_state(),
            random.getstate(),
            np.random.get_state()[1].tolist(),
        )

    recipe = load_recipe(write_recipe(workspace, tmp_path), ["stages.0.max_steps=1", "stages.1.max_steps=1"])
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    transformers_logging.enable_progress_bar(), enable_progress_bars()  # an earlier CLI test may have hidden them
    before = caller_state()
    assert before[:2] == (True, False)
    trainer_module.finetune(recipe, quiet=True)
    with pytest.raises(linearize.errors.LinearizeError, match="already holds this recipe's run"):
        trainer_module.finetune(recipe, quiet=True)
    after = caller_state()
    assert after[:2] == before[:2] and torch.equal(after[2], before[2]) and after[3:] == before[3:]


def test_the_librarys_finetune_leaves_the_callers_process_group_alone(workspace, tmp_path):
    """A script under torchrun that joined the process group itself (to evaluate across its processes afterwards,
    say) keeps it: `finetune` uses it and leaves it joined, and leaves alone only a group it joined itself."""
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, transformers\n"
        "import torch.distributed as dist\n"
        "from linearize.training.recipe import load_recipe\n"
        "from linearize.training.trainer import finetune\n"
        "dist.init_process_group('gloo')\n"
        "finetune(load_recipe(sys.argv[1], ['stages.0.max_steps=1', 'stages.1.max_steps=1']), quiet=True)\n"
        "dist.barrier()\n"
        f"open(f'{tmp_path}/joined-{{dist.get_rank()}}', 'w').write(transformers.__version__)\n"
    )
    env = process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run([*command, str(write_recipe(workspace, tmp_path))], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # both joined, on this process's transformers
    assert (tmp_path / "joined-0").read_text() == (tmp_path / "joined-1").read_text() == transformers.__version__


def test_gradient_checkpointing_gives_the_same_lora_step(workspace, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        folder = tmp_path / flag
        folder.mkdir()
        overrides = [f"training.gradient_checkpointing={flag}", "stages.0.max_steps=1", "stages.1.max_steps=2"]
        assert invoke("finetune", write_recipe(workspace, folder), *overrides).exit_code == 0
        runs[flag] = [r["loss"] for r in metrics(folder / "run") if "loss" in r]
    torch.testing.assert_close(runs["true"], runs["false"], rtol=0, atol=0)


def test_muon_stage_trains(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    overrides = ["stages.0.max_steps=1", "stages.1.optimizer.name=muon", "stages.1.optimizer.lr=0.02"]
    assert invoke("finetune", recipe, *overrides).exit_code == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


PARALLAX_RECIPE = """\
model: {{name: {source}}}
conversion: {{method: parallax}}
data:
  sources: [{{path: "{corpus}/*.txt"}}]
  seq_len: 32
  held_out: 2
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
stages:
  - kind: lora
    trainable: [lora, new]
    max_steps: 3
    optimizer: {{name: adamw, new_name: muon, lr: 0.005, new_lr: 0.01}}
output: {{dir: {out}}}
"""


def test_parallax_trains_its_probe_with_lora_and_refuses_attention_transfer(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path, PARALLAX_RECIPE)
    assert invoke("finetune", recipe).exit_code == 0
    steps = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["new_lr"] / r["lr"] for r in steps] == pytest.approx([2.0] * 3)  # the probe's own lr is logged
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(trained[f"model.layers.{i}.self_attn.r_proj.weight"].abs().max() > 0 for i in range(2))  # from 0
    transfer = write_recipe(workspace, tmp_path, PARALLAX_RECIPE.replace("kind: lora", "kind: attention_transfer"))
    result = invoke("recipe", "validate", transfer)
    assert (
        result.exit_code != 0 and "exactly at conversion" in result.output and "trainable: [lora, new]" in result.output
    )


def test_bf16_autocast_trains_fp32_weights_to_nearly_the_fp32_losses(workspace, tmp_path):
    """training.autocast=bfloat16 runs the forward under torch.autocast: the losses follow the fp32 run's to
    bfloat16 precision, while the weights, the optimizer state and the saved model stay in fp32."""
    runs = {}
    for precision in ("null", "bfloat16"):
        folder = tmp_path / precision
        folder.mkdir()
        result = invoke("finetune", write_recipe(workspace, folder), f"training.autocast={precision}", "-q")
        assert result.exit_code == 0, result.output
        steps = [r.get("mse", r.get("loss")) for r in metrics(folder / "run") if "global_step" in r]
        runs[precision] = [x for x in steps if x is not None]
    assert len(runs["bfloat16"]) == len(runs["null"]) == 8
    torch.testing.assert_close(runs["bfloat16"], runs["null"], rtol=0.05, atol=0)
    assert runs["bfloat16"] != runs["null"]  # autocast did run in bfloat16
    saved = load_file(tmp_path / "bfloat16" / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_every_epoch_shares_whole_steps_of_a_seeded_order_across_processes():
    """23 packs, 8 a step (2 x 2 x 2 processes): each epoch's two steps give every pack of 16 to one process once,
    the 7 left are other packs each epoch, and the batches depend on (seed, stage, epoch, step) alone, so a resumed
    run or another process computes the same ones."""
    packs = 23
    ids = torch.arange(packs)[:, None].expand(-1, 4)  # [23, 4]: each pack's tokens are its index
    training = TrainingSection(micro_batch_size=2, grad_accum=2, seed=3)
    steps, per_epoch = stage_steps(StageSection(kind="lora", epochs=3), packs, training, 2)
    assert (steps, per_epoch) == (6, 16)

    def trainer(rank: int) -> trainer_module.Trainer:  # only what the data order reads: no model, no data files
        made = object.__new__(trainer_module.Trainer)
        made.config, made.world, made._orders = training, World(rank=rank, size=2), {}
        made.data = FinetuneData(PackedSequences(ids, ids.clone()), PackedSequences(ids[:0], ids[:0]), [], [])
        return made

    def packs_of(made: trainer_module.Trainer, step: int) -> list[int]:
        return [int(i) for m in range(2) for i in made.micro_batch(0, step, m, per_epoch)["input_ids"][:, 0]]

    processes, left_out = [trainer(0), trainer(1)], []
    for epoch in range(3):
        visited = [p for step in (2 * epoch, 2 * epoch + 1) for made in processes for p in packs_of(made, step)]
        assert len(visited) == len(set(visited)) == 16
        left_out.append(set(range(packs)) - set(visited))
    assert len({frozenset(s) for s in left_out}) == 3
    resumed = trainer(1)  # built afresh at step 3, as a resumed run is
    assert packs_of(resumed, 3) == packs_of(processes[1], 3)


def test_any_whole_seed_trains(workspace, tmp_path):
    """torch takes 64-bit seeds: a larger training.seed (a date and time, say), or a data order's seed derived from
    it, must not stop the run with torch's "Overflow when unpacking long long" once the weights have loaded; and
    the seeds torch took before (negative ones too) keep their data order."""
    recipe = write_recipe(workspace, tmp_path)
    short = ["stages.0.max_steps=1", "stages.1.max_steps=1"]
    result = invoke("finetune", recipe, *short, "training.seed=20260101123456", "lora.dropout=0.1")
    assert result.exit_code == 0, result.exception
    made = object.__new__(trainer_module.Trainer)
    ids = torch.arange(23)[:, None]
    made.data = FinetuneData(PackedSequences(ids, ids), PackedSequences(ids[:0], ids[:0]), [], [])
    made.config, made._orders = TrainingSection(seed=-5), {}
    before = torch.randperm(23, generator=torch.Generator().manual_seed(-5 * 1_000_003 + 1009 + 2))
    assert made.order(1, 2).tolist() == before.tolist()


@pytest.mark.parametrize(("strategy", "data"), [("ddp", "text"), ("fsdp", "instructions")])
def test_two_processes_match_one_with_the_same_global_batch(strategy, data, workspace, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) logs the losses of one process with twice the accumulation, and
    saves the same model; with instruction packs, whose trained tokens differ, a step's loss is still the mean
    over all its tokens, counted across the processes."""
    losses, evals = {}, {}
    sources = [f"data.sources=[{{path: {instruction_file(tmp_path / 'alpaca.jsonl')}}}]"] if data != "text" else []
    for name, launcher, accum in (
        ("one", [sys.executable, "-m", "linearize"], 4),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "linearize"], 2),
    ):
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(workspace, folder)
        env = process_env()
        overrides = [f"training.grad_accum={accum}", f"training.distributed={strategy}", "stages.1.max_steps=2"]
        overrides.append("training.eval_batches=3")
        overrides += sources
        command = [*launcher, "finetune", str(recipe), *overrides, "-q"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [r.get("mse", r.get("loss")) for r in metrics(folder / "run") if "global_step" in r]
        losses[name] = [x for x in losses[name] if x is not None]
        evals[name] = [r.get("eval_mse", r.get("eval_loss")) for r in metrics(folder / "run") if "eval_ppl" in r or
                       "eval_mse" in r]  # fmt: skip
    assert len(losses["one"]) == 6
    torch.testing.assert_close(losses["two"], losses["one"], rtol=1e-5, atol=0)
    # the held-out batches (3) split across the processes, scored as one process scores them all
    assert len(evals["one"]) == 5  # each stage before its first step, and every 2 steps
    torch.testing.assert_close(evals["two"], evals["one"], rtol=1e-5, atol=0)
    one, two = (load_file(tmp_path / name / "run" / "model" / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_transfer_with_kept_softmax_layers_trains_only_the_converted_ones(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    stages = "stages=[{kind: attention_transfer, trainable: [lora], max_steps: 2}]"
    result = invoke("finetune", recipe, stages, "conversion.softmax_layers=0")
    assert result.exit_code == 0, result.output
    lora_b = {name: t for name, t in trained(tmp_path / "run").items() if "lora_B" in name and "o_proj" not in name}
    assert lora_b and all(("layers.0." in name) == (t.abs().sum() == 0) for name, t in lora_b.items()), {
        name: t.abs().sum().item() for name, t in lora_b.items()
    }


def test_auto_softmax_layers_at_conversion_are_scored_before_training(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    selection = f"conversion.selection={{scorer: output, calibration: '{workspace}/corpus/*.txt', windows: 1}}"
    short = ["stages.0.max_steps=1", "stages.1.max_steps=1"]
    result = invoke("finetune", recipe, *short, "conversion.softmax_layers=auto:1", selection)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["linearize"]
    scores = saved["layer_selection"]["scores"]
    assert saved["layer_selection"]["after"] == "conversion" and len(scores) == 2
    assert saved["softmax_layers"] == [max(range(2), key=scores.__getitem__)]
    assert "kept as softmax attention, layer (score)" in " ".join(result.output.split())


def test_a_data_error_stops_the_run_before_the_weights_load(workspace, tmp_path, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("")
    recipe = write_recipe(workspace, tmp_path)
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    result = invoke("finetune", recipe, f"data.sources=[{{path: {tmp_path / 'empty.jsonl'}}}]")
    assert result.exit_code == 1 and "holds no documents" in result.output


def test_a_model_that_cannot_convert_stops_the_run_before_the_data_and_the_weights(workspace, tmp_path, monkeypatch):
    """An already converted folder as model.name: refused from its config, naming what to give instead (the message
    told users to fine-tune it with `linearize finetune`, which is what refused it, after reading the data and the
    weights)."""
    assert invoke("convert", workspace / "source", "-o", tmp_path / "converted", "-q").exit_code == 0
    recipe = write_recipe(workspace, tmp_path)
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    monkeypatch.setattr(trainer_module, "load_data", lambda *args, **kwargs: pytest.fail("read the data"))
    for extra in (["--dry-run"], []):
        result = invoke("finetune", recipe, f"model.name={tmp_path / 'converted'}", *extra)
        shown = " ".join(result.output.split())
        assert result.exit_code == 1 and "already converted by linearize: give the model it came from" in shown
        assert "which `linearize convert` and `linearize finetune` convert themselves" in shown, extra
    assert not (tmp_path / "run" / "model").exists()


def test_conversion_errors_name_the_recipe_keys(workspace, tmp_path):
    """What the plan refuses is told as the recipe's keys: `linearize finetune` takes no --window or
    --softmax-layers option."""
    recipe = write_recipe(workspace, tmp_path)
    for override, key in (
        ("conversion.window=4096", "conversion.window 4096 is more tokens than the model reads"),
        ("conversion.softmax_layers=0,9", "conversion.softmax_layers '0,9': the model has 2 layers"),
    ):
        result = invoke("finetune", recipe, "--dry-run", override)
        shown = " ".join(result.output.split())
        assert result.exit_code == 1 and key in shown and " --" not in shown, shown
