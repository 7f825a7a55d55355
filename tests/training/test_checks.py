"""What a fine-tuning run refuses or warns of before it trains (linearize/training/checks.py), as the run and its
dry run say it: LoRA targets, stage order, steps, what a stage trains, float16 weights, optimizer settings of
parameters a stage does not train, Muon settings of a stage without Muon and AdamW's of one without AdamW, a cosine
floor under a constant schedule, LoRA settings without a LoRA stage, attention transfer on tokens the method computes
exactly, the calibration text of auto:K."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import linearize.sources
from linearize.cli import app
from linearize.training.checkpoint import list_checkpoints
from tests.tiny import source_folder, tiny_tokenizer
from tests.training.runs import RECIPE, invoke, write_recipe


def shown(recipe, *args) -> str:
    """`linearize finetune RECIPE ARGS` on a wide terminal, which must succeed: its output on one line."""
    result = CliRunner().invoke(app, [str(a) for a in ("finetune", recipe, *args)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_the_run_warns_of_lora_targets_that_match_no_layer_as_its_dry_run_notes(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    targets = "lora.target_modules=[q_proj, k_proj, v_proj, foo_proj]"
    result = invoke("finetune", recipe, targets, "stages.0.max_steps=1", "stages.1.max_steps=2", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: lora.target_modules ['foo_proj'] match no layer of this model" in " ".join(result.output.split())


def test_lora_targets_that_match_no_layer_are_refused_before_the_weights_load(workspace, tmp_path, monkeypatch):
    """peft refuses them only when the first stage that trains LoRA begins: a STILL run trained its attention transfer
    first, which the fixed recipe (another recipe) cannot resume. The run refuses them as its dry run does."""
    recipe = write_recipe(workspace, tmp_path)
    still = ["conversion={method: still, chunk_size: 4, topk: 2}", "stages.0.trainable=[new]"]
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    for extra in (["--dry-run"], []):
        result = invoke("finetune", recipe, *still, "lora.target_modules=[foo_proj]", *extra)
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and "lora.target_modules ['foo_proj'] name no layer of this model" in message
    assert not list_checkpoints(tmp_path / "run")


def test_lora_targets_that_name_a_module_lora_cannot_adapt_are_refused_before_the_weights_load(
    workspace, tmp_path, monkeypatch
):
    """A target that names a block (the MLP, the attention) rather than a linear layer was noted as matching no layer,
    and peft refused it when the first stage that trains LoRA began: after a STILL run's attention transfer."""
    recipe = write_recipe(workspace, tmp_path)
    still = ["conversion={method: still, chunk_size: 4, topk: 2}", "stages.0.trainable=[new]"]
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    for extra in (["--dry-run"], []):
        result = invoke("finetune", recipe, *still, "lora.target_modules=[q_proj, v_proj, mlp, self_attn]", *extra)
        message = " ".join(result.output.split())
        assert result.exit_code == 1, (extra, message)
        assert "lora.target_modules ['mlp', 'self_attn'] name modules that LoRA cannot adapt (LlamaMLP," in message
        assert "StillAttention): name the linear layers in them" in message
    assert not list_checkpoints(tmp_path / "run")


def test_the_run_and_its_dry_run_warn_of_a_new_parameters_optimizer_in_a_stage_that_does_not_train_them(
    workspace, tmp_path
):
    recipe = write_recipe(workspace, tmp_path)
    probe = ["stages.1.optimizer.new_lr=1e-4", "stages.1.optimizer.new_name=muon"]  # stage 1 trains [lora]
    warning = "stages.1.optimizer.new_lr and stages.1.optimizer.new_name apply to the parameters the method adds"

    assert "apply to the parameters" not in shown(recipe, "--dry-run")
    for extra in (["--dry-run"], ["stages.0.max_steps=1", "stages.1.max_steps=2", "-q"]):
        output = shown(recipe, *probe, *extra)
        assert warning in output and "they have no effect; add new to trainable" in output


def test_the_run_and_its_dry_run_warn_of_muon_settings_in_a_stage_that_does_not_use_muon(workspace, tmp_path):
    """muon_momentum and muon_lr_adjust set Muon, which an adamw stage does not use: they were taken and ignored (a
    Muon recipe whose optimizer is overridden to adamw for a comparison keeps them, so the run warns)."""
    recipe = write_recipe(workspace, tmp_path)
    muon = ["stages.1.optimizer.muon_momentum=0.9", "stages.1.optimizer.muon_lr_adjust=original"]
    warning = "stages.1.optimizer.muon_momentum and stages.1.optimizer.muon_lr_adjust set Muon, which stages.1 does"

    assert "set Muon" not in shown(recipe, "--dry-run")
    assert "set Muon" not in shown(recipe, *muon, "stages.1.optimizer.name=muon", "--dry-run")
    # Muon trains the parameters the method adds, in a stage that trains them
    still = ["conversion={method: still, chunk_size: 4, topk: 2}", "stages.1.trainable=[lora, new]"]
    assert "set Muon" not in shown(recipe, *still, *muon, "stages.1.optimizer.new_name=muon", "--dry-run")
    for extra in (["--dry-run"], ["stages.0.max_steps=1", "stages.1.max_steps=2", "-q"]):
        output = shown(recipe, *muon, *extra)
        assert warning in output and "not use (optimizer.name adamw): they have no effect" in output


def test_the_run_and_its_dry_run_warn_of_adamw_betas_where_muon_trains_every_parameter(workspace, tmp_path):
    """Muon takes the matrices and AdamW the rest: LoRA's adapters are all matrices, so a stage that trains LoRA alone
    with muon has no AdamW, and its betas were taken and ignored."""
    recipe = write_recipe(workspace, tmp_path)
    betas = "stages.1.optimizer={name: muon, betas: [0.8, 0.99]}"  # stage 1 trains [lora]
    warning = "stages.1.optimizer.betas set AdamW, and Muon trains every parameter of stages.1 (LoRA's are matrices)"

    assert "betas set AdamW" not in shown(recipe, "stages.1.optimizer={name: adamw, betas: [0.8, 0.99]}", "--dry-run")
    assert "betas set AdamW" not in shown(recipe, "stages.1.optimizer.name=muon", "--dry-run")  # the default betas
    still = ["conversion={method: still, chunk_size: 4, topk: 2}", "stages.1.trainable=[lora, new]"]
    assert "betas set AdamW" not in shown(recipe, *still, betas, "--dry-run")  # the added parameters may be vectors
    for extra in (["--dry-run"], ["stages.0.max_steps=1", "stages.1.max_steps=2", "-q"]):
        output = shown(recipe, betas, *extra)
        assert warning in output and "they have no effect; drop them, or set optimizer.name: adamw" in output


def test_the_run_and_its_dry_run_warn_of_a_cosine_floor_under_a_constant_schedule(workspace, tmp_path):
    """min_lr_ratio is the floor the cosine schedule decays to: under a constant one it was taken and ignored."""
    recipe = write_recipe(workspace, tmp_path)
    constant = "stages.1.schedule={kind: constant, min_lr_ratio: 0.5}"
    warning = "stages.1.schedule.min_lr_ratio (0.5) is the floor of the cosine schedule, and stages.1 has a constant"

    assert "floor of the cosine" not in shown(recipe, "stages.1.schedule.kind=constant", "--dry-run")  # the default
    assert "floor of the cosine" not in shown(recipe, "stages.1.schedule.min_lr_ratio=0.5", "--dry-run")  # cosine
    for extra in (["--dry-run"], ["stages.0.max_steps=1", "stages.1.max_steps=2", "-q"]):
        output = shown(recipe, constant, *extra)
        assert warning in output and "it has no effect; set schedule.kind: cosine, or drop it" in output


def test_the_run_and_its_dry_run_warn_of_a_lora_section_when_no_stage_trains_lora(workspace, tmp_path):
    """The lora section sets the adapters of the stages that train LoRA: without one it was taken and ignored."""
    recipe = write_recipe(workspace, tmp_path)  # lora: {r: 4, alpha: 8 (the default), target_modules: [q_proj, ...]}
    still = "conversion={method: still, chunk_size: 4, topk: 2}"
    transfer = "stages=[{kind: attention_transfer, trainable: [new], max_steps: 1}]"
    warning = "lora.r and lora.target_modules set the LoRA adapters, and no stage trains LoRA (trainable: [lora]): they"

    assert "no stage trains LoRA" not in shown(recipe, still, "--dry-run")
    assert "no stage trains LoRA" not in shown(recipe, still, transfer, "lora={}", "--dry-run")  # the defaults
    for extra in (["--dry-run"], ["-q"]):
        output = shown(recipe, still, transfer, *extra)
        assert warning in output and "they have no effect; add lora to a stage's trainable, or drop them" in output


def test_still_transfer_on_documents_within_its_exact_chunks_is_warned_of(workspace, tmp_path):
    """STILL's first two chunks of a document are exact softmax attention, so its tokens there give attention
    transfer no gradient: packs of 32 tokens (positions restart at each pack) under the default 64-token chunks
    teach it nothing."""
    recipe = write_recipe(workspace, tmp_path)
    still = ["conversion={method: still}", "stages.0.trainable=[lora, new]"]
    warning = "attention transfer trains still's new parameters only on tokens past the first 128 of their document"

    dry_run = shown(recipe, *still, "--dry-run")
    assert warning in dry_run and "and 0% of the training tokens are" in dry_run
    assert "new parameters only on tokens" not in shown(recipe, *still, "conversion.chunk_size=4", "--dry-run")
    assert "new parameters only on tokens" not in shown(recipe, "conversion={method: still}", "--dry-run")  # LoRA alone
    assert warning in shown(recipe, *still, "stages.0.max_steps=1", "stages.1.max_steps=2", "-q")  # the run warns too


def test_float16_weights_are_warned_of_as_trained_without_loss_scaling(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    half = shutil.copytree(workspace / "source", tmp_path / "half")
    config = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    warning = "trains float16 weights without loss scaling"

    assert warning in shown(recipe, "model.dtype=float16", "--dry-run")
    assert f"model.dtype auto (the checkpoint is float16) {warning}" in shown(
        recipe, f"model.name={half}", "model.dtype=auto", "--dry-run"
    )
    for dtype in ("auto", "bfloat16"):  # the tiny source is saved in float32
        assert warning not in shown(recipe, f"model.dtype={dtype}", "--dry-run")
    assert warning in shown(recipe, "model.dtype=float16", "stages.0.max_steps=1", "stages.1.max_steps=2", "-q")


def test_fsdp_with_a_transfer_after_lora_is_refused_by_the_dry_run_under_torchrun(workspace, tmp_path, monkeypatch):
    """The run refuses it before the weights load; its dry run under torchrun must say so too."""
    recipe = write_recipe(workspace, tmp_path)
    stages = "stages=[{kind: lora, max_steps: 1}, {kind: attention_transfer, trainable: [lora], max_steps: 1}]"
    assert invoke("finetune", recipe, stages, "training.distributed=fsdp", "--dry-run").exit_code == 0  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("finetune", recipe, stages, "training.distributed=fsdp", "--dry-run")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "every attention_transfer stage must come before them; reorder" in message


def test_too_little_data_for_one_step(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe, "training.grad_accum=64")
    assert result.exit_code == 1 and "fewer than one optimizer step uses" in result.output


def test_attention_transfer_refuses_an_adapter_on_o_proj_alone(workspace, tmp_path, monkeypatch):
    """Attention transfer's loss is on the attention output before o_proj, so o_proj's adapter gets no gradient:
    with no other adapter in the attention (Phi-3's qkv_proj left out) the stage would train nothing, silently.
    The dry run and the run refuse it, naming the family's own input projections."""
    source_folder(tmp_path / "phi3", "phi3")
    monkeypatch.setattr(linearize.sources, "_load_tokenizer", lambda *args: tiny_tokenizer())
    recipe = write_recipe(workspace, tmp_path, RECIPE.replace("{source}", str(tmp_path / "phi3")))
    for extra in (["--dry-run"], []):
        result = invoke("finetune", recipe, *extra)
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and "stages.0 (attention_transfer) has nothing to train" in message, extra
        assert "add its input projections (qkv_proj) to lora.target_modules" in message
    assert not (tmp_path / "run" / "model").exists()


def test_a_transfer_with_nothing_to_train_is_refused_by_the_run_before_the_weights_load(
    workspace, tmp_path, monkeypatch
):
    """The dry run refused an attention_transfer stage that trains nothing, and the run found it only when the stage
    began: after the weights loaded, and after the lora stage before it had trained. The run refuses it as its dry
    run does."""
    recipe = write_recipe(workspace, tmp_path)
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    after_lora = [
        "stages=[{kind: lora, max_steps: 1}, {kind: attention_transfer, trainable: [lora], max_steps: 1}]",
        "lora.target_modules=[o_proj, gate_proj]",
    ]
    # with trainable [new] the dry run let it through too
    every_layer_kept = ["conversion={method: still, chunk_size: 4, topk: 2, softmax_layers: '0,1'}"]
    every_layer_kept += ["stages.0.trainable=[new]"]
    for overrides, problem in [
        (after_lora, "stages.1 (attention_transfer) has nothing to train: it trains the converted attention layers"),
        (every_layer_kept, "stages.0 (attention_transfer) has nothing to train: conversion.softmax_layers keeps every"),
    ]:
        for extra in (["--dry-run"], []):
            result = invoke("finetune", recipe, *overrides, *extra)
            message = " ".join(result.output.split())
            assert result.exit_code == 1 and problem in message, (extra, message)
    assert not list_checkpoints(tmp_path / "run")


def test_a_calibration_text_that_cannot_be_read_is_refused_before_the_weights_load(workspace, tmp_path, monkeypatch):
    """auto:K scored after attention transfer read its calibration text only once the transfer stages were done: a
    mistyped path cost them (and a fixed one is another recipe, which cannot resume them). The run and its dry run
    read it with the data."""
    recipe = write_recipe(workspace, tmp_path)
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    for text, problem in [
        (tmp_path / "missing.txt", f"data file {tmp_path / 'missing.txt'} not found"),
        (tmp_path / "short.txt", "is too short to score layers on"),
        # the recipe's key, not the --calibration of `linearize convert`
        (tmp_path / "short.txt", "give conversion.selection.calibration a longer text (its default, builtin, is"),
    ]:
        selection = f"conversion.selection={{scorer: output, after: attention_transfer, calibration: '{text}'}}"
        for extra in (["--dry-run"], []):
            result = invoke("finetune", recipe, "conversion.softmax_layers=auto:1", selection, *extra)
            message = " ".join(result.output.split())
            assert result.exit_code == 1 and "Error: conversion.selection.calibration: " in message, (extra, message)
            assert problem in message
    # a malformed hf: spec is named once (it read 'conversion.selection.calibration: conversion.selection...')
    selection = "conversion.selection={scorer: output, after: attention_transfer, calibration: 'hf:'}"
    for extra in (["--dry-run"], []):
        result = invoke("finetune", recipe, "conversion.softmax_layers=auto:1", selection, *extra)
        message = " ".join(result.output.split())
        assert "Error: conversion.selection.calibration 'hf:': write hf:NAME, hf:NAME:CONFIG" in message, message
    assert not list_checkpoints(tmp_path / "run")
