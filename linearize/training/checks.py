"""What a recipe's run will meet, found before training where possible: the same checks serve the run (its
warnings and errors) and `finetune --dry-run` (its notes), so the two cannot disagree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..data import PackedSequences
from ..errors import LinearizeError
from ..families import get_family
from ..layers.base import LinearizedAttention
from ..methods import get_method, method_settings
from ..selection import calibration_windows, check_calibration_source
from .recipe import Recipe, StageSection, TrainingSection


class LoraTargets(NamedTuple):
    """What lora.target_modules name in a converted model, as peft matches them (a module's name or its last
    parts)."""

    unmatched: list[str]  # the targets that name no linear layer
    layer_names: list[str]  # the names the model's linear layers end in
    in_attention: bool  # whether one names a layer of a converted attention before its o_proj (transfer trains it)
    unadaptable: dict[str, str]  # target -> the type of a module it names that LoRA cannot adapt (a block)


def lora_targets(config, targets: list[str]) -> LoraTargets:
    """What `targets` (lora.target_modules) name in the converted model `config` describes, found on a model without
    weights, so that a dry run tells before any weights load."""
    from ..models import LinearizeForCausalLM

    with torch.device("meta"):
        model = LinearizeForCausalLM(config)
    modules = dict(model.named_modules())
    names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    converted = [f"{name}." for name, module in modules.items() if isinstance(module, LinearizedAttention)]

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith(f".{target}")

    unmatched = [t for t in targets if not any(matches(name, t) for name in names)]
    in_attention = any(
        matches(name, t) and any(transfer_trains(name, layer) for layer in converted) for name in names for t in targets
    )
    unadaptable = {  # peft adapts linear layers and embeddings, and refuses to adapt any other module a target names
        t: type(module).__name__
        for t in targets
        for name, module in modules.items()
        if matches(name, t) and not isinstance(module, nn.Linear | nn.Embedding)
    }
    return LoraTargets(unmatched, sorted({name.rsplit(".", 1)[-1] for name in names}), in_attention, unadaptable)


def check_lora_targets(recipe: Recipe, found: LoraTargets) -> None:
    """Refuse lora.target_modules (`found` by `lora_targets`) that peft refuses while a stage trains LoRA: any that
    names a module LoRA cannot adapt, or all of them when none names a linear layer. peft refuses them only when
    the first such stage begins, after the stages before it have trained."""
    targets = recipe.lora.target_modules
    if not any("lora" in stage.trainable for stage in recipe.stages):
        return
    if found.unadaptable:
        raise LinearizeError(
            f"lora.target_modules {list(found.unadaptable)} name modules that LoRA cannot adapt "
            f"({', '.join(found.unadaptable.values())}): name the linear layers in them; this model's linear layers "
            f"are {found.layer_names}"
        )
    if len(found.unmatched) == len(targets):
        raise LinearizeError(
            f"lora.target_modules {targets} name no layer of this model; its linear layers are {found.layer_names}"
        )


def unmatched_targets_note(recipe: Recipe, found: LoraTargets) -> str | None:
    """What a run warns and its dry run notes when some of lora.target_modules name no linear layer (`found` by
    `lora_targets`) while a stage trains LoRA: peft adapts the others and says nothing (when none matches, peft
    refuses the run)."""
    targets, unmatched = recipe.lora.target_modules, found.unmatched
    if not unmatched or len(unmatched) == len(targets) or not any("lora" in s.trainable for s in recipe.stages):
        return None
    return f"lora.target_modules {unmatched} match no layer of this model (its linear layers: {found.layer_names})"


def check_stage_order(recipe: Recipe, processes: int) -> None:
    """Refuse what `training.distributed: fsdp` cannot run on `processes` processes: an attention_transfer stage
    after a lora stage (one process ignores fsdp, so it runs them)."""
    kinds = [stage.kind for stage in recipe.stages]
    after_lora = kinds[kinds.index("lora") :] if "lora" in kinds else []
    if processes > 1 and recipe.training.distributed == "fsdp" and "attention_transfer" in after_lora:
        raise LinearizeError(
            "under training.distributed: fsdp the lora stages shard the model for good, so every "
            "attention_transfer stage must come before them; reorder the stages or use ddp"
        )


def transfer_trains(name: str, attention: str) -> bool:
    """Whether attention transfer trains parameter or module `name`, given the converted attention layer's name
    `attention` (with its trailing dot): anything of it but o_proj, since the loss is on the output o_proj reads."""
    return name.startswith(attention) and not name.startswith(f"{attention}o_proj")


def nothing_to_train(
    index: int, stage: StageSection, targets: list[str], projections: Sequence[str], converted: bool = True
) -> str:
    """Why stage `index` trains no parameter, and the fix; `projections`: the attention's input projections."""
    if stage.kind == "attention_transfer" and not converted:
        return (
            f"stages.{index} (attention_transfer) has nothing to train: conversion.softmax_layers keeps every layer "
            "as softmax attention, so no layer is converted; keep fewer layers or drop the stage"
        )
    if stage.kind == "attention_transfer":
        return (
            f"stages.{index} (attention_transfer) has nothing to train: it trains the converted attention layers "
            f"only, and lora.target_modules {targets} put no adapter in them before o_proj (whose adapter gets no "
            f"gradient there: the loss is on the attention output o_proj reads); add its input projections "
            f"({', '.join(projections)}) to lora.target_modules"
        )
    return f"stages.{index} ({stage.kind}) has nothing to train with trainable {stage.trainable}"


def check_transfer_trains(recipe: Recipe, config, in_attention: bool) -> None:
    """Refuse an attention_transfer stage that would train nothing, on the converted model `config` describes
    (`in_attention` as `lora_targets` finds it): the run meets it only when that stage begins, once the weights have
    loaded and the stages before it have trained."""
    converted = bool(config.converted_layers())
    adds = get_method(recipe.conversion.method).adds_parameters
    for index, stage in enumerate(recipe.stages):
        trains = ("new" in stage.trainable and adds) or ("lora" in stage.trainable and in_attention)
        if stage.kind == "attention_transfer" and not (converted and trains):
            projections = get_family(config.base_model_type).input_projections
            raise LinearizeError(nothing_to_train(index, stage, recipe.lora.target_modules, projections, converted))


def positions_note(recipe: Recipe, source_config) -> str | None:
    """A warning for packs longer than the source model reads (fine when extending its context on purpose)."""
    most = getattr(source_config, "max_position_embeddings", None)
    if most is None or recipe.data.seq_len <= most:
        return None
    return (
        f"data.seq_len ({recipe.data.seq_len}) is more tokens than the model reads ({most}, its config's "
        "max_position_embeddings): training sees positions it never saw in pretraining; lower data.seq_len unless "
        "you mean to extend its context"
    )


def float16_note(recipe: Recipe, source_config) -> str | None:
    """A warning for training float16 weights (model.dtype float16, or auto on a float16 checkpoint): nothing scales
    the loss, as mixed precision does for float32 weights."""
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = str(getattr(source_config, "dtype", None) or "").removeprefix("torch.")
    if dtype != "float16":
        return None
    return (
        f"model.dtype {recipe.model.dtype}{' (the checkpoint is float16)' * (recipe.model.dtype == 'auto')} trains "
        "float16 weights without loss scaling: small gradients round to zero and large activations overflow to inf; "
        "set model.dtype: bfloat16, or float32 with training.autocast: bfloat16"
    )


def warmup_note(index: int, stage: StageSection, total_steps: int) -> str | None:
    """A warning for a stage of `total_steps` optimizer steps whose warmup does not end before the stage does (fine
    for a smoke test of a few steps, a mistake in a real run)."""
    warmup = stage.schedule.warmup_steps
    if warmup < total_steps:
        return None
    return (
        f"stages.{index}.schedule.warmup_steps ({warmup}) is not below the stage's {total_steps} optimizer steps: its "
        f"learning rate never reaches the peak {stage.optimizer.lr:g}; lower warmup_steps (a few percent of the "
        "steps is usual) unless this is a smoke test"
    )


def new_optimizer_note(index: int, stage: StageSection) -> str | None:
    """A warning for optimizer settings of the method's new parameters in a stage that does not train them (fine for
    a LoRA-only control run by overriding `trainable`, a mistake otherwise)."""
    optimizer = stage.optimizer
    set_keys = _changed(optimizer, ("new_lr", "new_name"))
    if not set_keys or "new" in stage.trainable:
        return None
    named = " and ".join(f"stages.{index}.optimizer.{key}" for key in set_keys)
    return (
        f"{named} apply to the parameters the method adds, which stages.{index} does not train (trainable "
        f"{stage.trainable}): they have no effect; add new to trainable, or drop them"
    )


def _changed(section, keys: Sequence[str] | None = None) -> list[str]:
    """The keys of a recipe `section` (all of its fields by default) whose values are not their defaults: a resolved
    recipe writes every default, so a key being written says nothing of whether the user set it."""
    fields = type(section).model_fields
    defaults = {key: fields[key].get_default(call_default_factory=True) for key in keys or fields}
    return [key for key, default in defaults.items() if getattr(section, key) != default]


def muon_note(index: int, stage: StageSection) -> str | None:
    """A warning for Muon's settings in a stage that trains nothing with Muon (fine for a Muon recipe whose optimizer
    is overridden to adamw for a comparison, a mistake otherwise)."""
    optimizer = stage.optimizer
    own = optimizer.name == "muon" and "lora" in stage.trainable
    new = (optimizer.new_name or optimizer.name) == "muon" and "new" in stage.trainable
    set_keys = _changed(optimizer, ("muon_momentum", "muon_lr_adjust"))
    if not set_keys or own or new:
        return None
    named = " and ".join(f"stages.{index}.optimizer.{key}" for key in set_keys)
    used = f"optimizer.name {optimizer.name}" + (f", new_name {optimizer.new_name}" if optimizer.new_name else "")
    return (
        f"{named} set Muon, which stages.{index} does not use ({used}): they have no effect; set optimizer.name: "
        "muon, or drop them"
    )


def betas_note(index: int, stage: StageSection) -> str | None:
    """A warning for AdamW's betas in a stage that Muon trains whole: Muon takes the matrices, and LoRA's adapters are
    all matrices (the parameters a method adds may not be, so a stage that trains them is not warned of)."""
    optimizer = stage.optimizer
    if optimizer.name != "muon" or stage.trainable != ["lora"] or not _changed(optimizer, ("betas",)):
        return None
    return (
        f"stages.{index}.optimizer.betas set AdamW, and Muon trains every parameter of stages.{index} (LoRA's are "
        "matrices): they have no effect; drop them, or set optimizer.name: adamw"
    )


def lora_note(recipe: Recipe) -> str | None:
    """A warning for LoRA settings in a recipe none of whose stages trains LoRA (fine for a LoRA recipe whose stages
    are overridden for a control run, a mistake otherwise)."""
    set_keys = [f"lora.{key}" for key in _changed(recipe.lora)]
    if not set_keys or any("lora" in stage.trainable for stage in recipe.stages):
        return None
    named = ", ".join(set_keys[:-1]) + " and " * (len(set_keys) > 1) + set_keys[-1]
    return (
        f"{named} set the LoRA adapters, and no stage trains LoRA (trainable: [lora]): they have no effect; add lora "
        "to a stage's trainable, or drop them"
    )


def cosine_floor_note(index: int, stage: StageSection) -> str | None:
    """A warning for a cosine floor under a constant schedule (fine for a cosine recipe overridden to constant for
    a comparison, a mistake otherwise)."""
    schedule = stage.schedule
    if schedule.kind != "constant" or not _changed(schedule, ("min_lr_ratio",)):
        return None
    return (
        f"stages.{index}.schedule.min_lr_ratio ({schedule.min_lr_ratio:g}) is the floor of the cosine schedule, and "
        f"stages.{index} has a constant one: it has no effect; set schedule.kind: cosine, or drop it"
    )


def transfer_signal_note(recipe: Recipe, train: PackedSequences) -> str | None:
    """A warning for attention transfer of the method's new parameters on packs whose tokens mostly sit at the start
    of their documents, where the method's layers compute softmax attention exactly whatever those parameters are
    (STILL's first two chunks): such tokens give them no gradient, so the stages train them on few tokens."""
    conversion = recipe.conversion
    prefix = method_settings(conversion.method, **conversion.options()).exact_prefix()
    trains_new = any(stage.kind == "attention_transfer" and "new" in stage.trainable for stage in recipe.stages)
    if not prefix or not trains_new:
        return None
    positions = train.position_ids if train.position_ids is not None else torch.arange(train.input_ids.shape[1])
    share = float((positions >= prefix).float().mean())
    if share >= 0.5:
        return None
    return (
        f"attention transfer trains {conversion.method}'s new parameters only on tokens past the first {prefix} of "
        f"their document, before which its layers compute exactly softmax attention, and {share:.0%} of the training "
        f"tokens are: longer documents, or data.document_boundaries: false with a data.seq_len well above {prefix}, "
        "give its stages more to learn from"
    )


def recipe_notes(recipe: Recipe, source_config, train: PackedSequences) -> list[str]:
    """What a run warns of (and its dry run notes) from the recipe, the source's config and the packed training data
    alone; the LoRA targets and the warmup are checked against the model and the steps, where each is known."""
    found = [
        positions_note(recipe, source_config),
        float16_note(recipe, source_config),
        transfer_signal_note(recipe, train),
        lora_note(recipe),
        *(new_optimizer_note(index, stage) for index, stage in enumerate(recipe.stages)),
        *(muon_note(index, stage) for index, stage in enumerate(recipe.stages)),
        *(betas_note(index, stage) for index, stage in enumerate(recipe.stages)),
        *(cosine_floor_note(index, stage) for index, stage in enumerate(recipe.stages)),
    ]
    return [note for note in found if note]


def check_calibration(recipe: Recipe, tokenizer) -> None:
    """Read the text that `conversion.softmax_layers: auto:K` scores layers on, as scoring will: with `selection.after:
    attention_transfer` scoring comes after the stages that open the recipe, and a missing or too short text found
    only then would cost them (a fixed path is another recipe, which cannot resume them)."""
    request = recipe.conversion.selection_request()
    if request is None:
        return
    key = "conversion.selection.calibration"
    check_calibration_source(request, option=key)  # its messages name the key once already
    try:
        calibration_windows(request, tokenizer, option=key)
    except LinearizeError as error:
        raise LinearizeError(f"{key}: {error}") from None


def stage_steps(stage: StageSection, packs: int, training: TrainingSection, processes: int) -> tuple[int, int]:
    """(optimizer steps of `stage` over `packs` training sequences, sequences an epoch actually uses)."""
    per_step = training.micro_batch_size * training.grad_accum * processes
    steps_per_epoch = packs // per_step
    if steps_per_epoch == 0:
        raise LinearizeError(
            f"the training data has {packs} packed sequences, fewer than one optimizer step uses ({per_step} = "
            "micro_batch_size x grad_accum x processes); add data, shorten data.seq_len or lower training.grad_accum"
        )
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    return total, steps_per_epoch * per_step
