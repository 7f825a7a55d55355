"""Fine-tuning recipes: a YAML file validated into pydantic models, with `key=value` overrides.

A recipe is what users share, so every mistake is reported against the file: YAML syntax errors with their
line, unknown keys with the nearest valid key, wrong values with their dotted path. `resolved_yaml` writes the
recipe back with every default filled in; its fingerprint (`fingerprints.recipe_hash`) guards resume.
"""

from __future__ import annotations

import difflib
import functools
import operator
import os
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from ..comparison import EMBEDDED
from ..errors import LinearizeError
from ..families import CONVERT_LAYERS
from ..hub import check_repo_id
from ..methods import METHODS, all_parameters, describe_parameter, get_method, method_settings
from ..sections import Section
from ..selection import (
    CALIBRATION_TEXT,
    CALIBRATION_WINDOWS,
    DEFAULT_SCORER,
    SCORERS,
    SelectionRequest,
    parse_auto,
)
from ..softmax_layers import check_softmax_layers
from .data import DataConfig


class RecipeError(LinearizeError, ValueError):
    """The recipe file or an override is malformed or invalid."""


class ModelSection(Section):
    name: str | None = Field(
        None,
        description="Hub id or local folder of the model to convert; null (or embedded) for the embedded "
        "SmolLM2-135M-Instruct",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `name`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the model is loaded and trained in (the linear state stays fp32 regardless)"
    )

    @field_validator("name")
    @classmethod
    def _embedded_is_null(cls, value: str | None) -> str | None:
        # the word `convert`, `eval`, `bench` and `generate` take for the embedded default: as null, so that the run
        # loads it (not a local folder of that name) and is the same run, checkpoints included, either way
        return None if value == EMBEDDED else value

    @model_validator(mode="after")
    def _revision_of_a_hub_id(self) -> ModelSection:
        if self.revision is not None and self.name is None:
            raise ValueError(
                "model.revision applies to a Hub id (model.name: org/model), and the embedded model has none; remove "
                "it, or name the Hub model"
            )
        return self


class SelectionSection(Section):
    scorer: Literal[tuple(SCORERS)] = Field(
        DEFAULT_SCORER, description="how a layer is scored: " + "; ".join(f"{k}: {v}" for k, v in SCORERS.items())
    )
    calibration: str = Field(
        CALIBRATION_TEXT,
        description="text the layers are scored on, as `linearize eval --text` takes it (builtin: the built-in "
        "corpus's training split)",
    )
    windows: int = Field(CALIBRATION_WINDOWS, ge=1, description="512-token windows of calibration text scored")
    after: Literal["conversion", "attention_transfer"] = Field(
        "conversion",
        description="score before training, or after the attention_transfer stages that open the recipe (scores "
        "from the trained converted layers; the kept layers' transfer is discarded)",
    )
    spread: bool | Annotated[int, Field(ge=1)] = Field(
        False,
        description="true: keep the highest-scoring layer of each of K equal stretches of the depth instead of the K "
        "highest-scoring layers; a number S (1 to K): the best of each of S stretches, then the K - S "
        "highest-scoring others",
    )


class _ConversionFields(Section):
    method: str = Field("liger", description="conversion method: " + ", ".join(METHODS) + " (see `linearize convert`)")
    softmax_layers: str = Field(
        "",
        description="layers kept as softmax attention: '0,8,16', 'every:8', 'auto:K' (the K layers that converting "
        "hurts most, measured; see `selection`) or '' (none)",
    )
    selection: SelectionSection | None = Field(None, description="with softmax_layers auto:K: how layers are scored")
    convert_layers: Literal[CONVERT_LAYERS] | None = Field(
        None,
        description="with sliding-window layers among global ones (Gemma 2/3): convert the global layers only "
        "(their default) or all; null: the family's default",
    )


def counts_or_ratios() -> list[str]:
    """The method parameters that take a count or a ratio (`int | float`)."""
    return [
        name
        for name, takers in all_parameters().items()
        if any({int, float} <= set(typing.get_args(p.annotation)) for _, p in takers)
    ]


def _method_fields() -> dict[str, Any]:
    """One optional field per parameter any method declares (`linearize.methods`), null meaning the default."""
    fields = {}
    for name, takers in all_parameters().items():
        annotation = functools.reduce(operator.or_, (p.annotation for _, p in takers))
        fields[name] = (annotation | None, Field(None, description=describe_parameter(takers)))
    return fields


def _recipe_key(name: str) -> str:
    """How messages name a conversion parameter a recipe sets (the CLI names its flag)."""
    return f"conversion.{name}"


class ConversionSection(create_model("_ConversionSection", __base__=_ConversionFields, **_method_fields())):
    """The `conversion` section: the method, its parameters (those of `linearize.methods`) and the kept layers."""

    @classmethod
    def method_options(cls) -> list[str]:
        """The fields that are method parameters, in declaration order."""
        return list(all_parameters())

    def options(self) -> dict[str, Any]:
        """The method parameters the recipe sets (None: the method's default)."""
        return {name: getattr(self, name) for name in self.method_options()}

    def plan(self, source_config, source: str, selection=None):
        """The `ConversionPlan` this section describes, from the source config alone; with 'auto:K', every layer
        converted until a scored `selection` (a `linearize.selection.LayerSelection`) is given."""
        from ..convert import plan_conversion

        layers = selection or self.softmax_layers or None
        return plan_conversion(
            source_config, source, self.method, layers, convert_layers=self.convert_layers, spell=_recipe_key,
            **self.options(),
        )  # fmt: skip

    def selection_request(self) -> SelectionRequest | None:
        """What 'auto:K' asks for, or None for named layers."""
        spec = self.selection or SelectionSection()
        return parse_auto(
            self.softmax_layers,
            spec.scorer,
            spec.spread,
            spell=_recipe_key,
            spread_option=_recipe_key("selection.spread"),
            calibration=spec.calibration,
            windows=spec.windows,
        )

    @property
    def selects_after_transfer(self) -> bool:
        return self.selection is not None and self.selection.after == "attention_transfer"

    @model_validator(mode="after")
    def _settings_valid(self) -> ConversionSection:
        if self.method in METHODS:
            try:
                settings = method_settings(self.method, spell=_recipe_key, **self.options())
                check_softmax_layers(self.softmax_layers, spell=_recipe_key)  # the indices need the model's depth
                request = self.selection_request()  # K, and the spread against K
                if request is not None:
                    request.check_method(
                        self.method, settings, _recipe_key, self.selection.after if self.selection else "conversion"
                    )
            except LinearizeError as error:
                raise ValueError(str(error)) from None
            if self.selection is not None and request is None:
                raise ValueError(
                    "selection applies to softmax_layers: auto:K (it says how the K layers are chosen); set "
                    "softmax_layers to auto:K or remove selection"
                )
        return self

    @field_validator("softmax_layers", mode="before")
    @classmethod
    def _layers_as_text(cls, value: Any) -> Any:
        """YAML reads `0` as a number and `[0, 8]` as a list: both mean the same layers as '0' and '0,8'."""
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(i, int) for i in value):
            return ",".join(map(str, value))
        return value

    @field_validator(*counts_or_ratios())
    @classmethod
    def _whole_count_as_int(cls, value: Any) -> Any:
        """8.0 is the count 8 where a count or a ratio is allowed (`topk`): the resolved recipe writes `topk: 8`,
        as the user did."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; choose one of: {', '.join(METHODS)}")
        return value


class LoraSection(Section):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj"], min_length=1, description="names of the linear modules that get adapters"
    )


# an AdamW beta: torch refuses one outside [0, 1), but only once the model has loaded
_Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerSection(Section):
    name: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw, or muon (torch.optim.Muon on 2-D weights, AdamW on the rest)"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    new_lr: float | None = Field(
        None, gt=0, description="peak learning rate of the parameters the method adds (e.g. Parallax's probe); null: lr"
    )
    new_name: Literal["adamw", "muon"] | None = Field(
        None,
        description="optimizer of the parameters the method adds (muon: their 2-D weights, AdamW the rest); "
        "null: name. With LoRA, `name: adamw, new_name: muon` trains a Parallax probe with Muon beside AdamW's "
        "LoRA, as a LoRA-only control trains",
    )
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    muon_momentum: float = Field(0.95, gt=0, lt=1, description="Muon momentum (muon only)")
    muon_lr_adjust: Literal["match_rms_adamw", "original"] = Field(
        "match_rms_adamw",
        description="muon only: match_rms_adamw scales each matrix's update to AdamW's typical size, so lr means "
        "what it means for adamw; original is Keller Jordan's max(1, rows / cols) ** 0.5",
    )


class ScheduleSection(Section):
    kind: Literal["cosine", "constant"] = Field("cosine", description="learning-rate shape after warmup")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a fraction of the peak lr")


MSE_FACTOR = 1000.0  # LoLCATs' attention-transfer loss multiplier


class StageSection(Section):
    kind: Literal["attention_transfer", "lora"] = Field(
        description="attention_transfer: match the original attention outputs layer by layer (MSE); "
        "lora: next-token loss with LoRA adapters"
    )
    trainable: list[Literal["new", "lora"]] | None = Field(
        None,
        description="what trains: 'new' (parameters the method adds) and/or 'lora'; default ['new'] for "
        "attention_transfer, ['lora'] for lora",
    )
    epochs: float = Field(
        1.0,
        gt=0,
        description="passes over the training data (fractions allowed), each in whole optimizer steps: packs short "
        "of one step are left out of an epoch, others each epoch",
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    mse_factor: float = Field(
        MSE_FACTOR,
        gt=0,
        description="attention_transfer only: loss multiplier (LoLCATs uses 1000; keeps Adam above its eps)",
    )
    kd_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="lora only: weight of distillation from the original model (KL divergence to its next-token "
        "distribution, computed on the fly); the next-token loss gets 1 - kd_ratio",
    )

    @model_validator(mode="after")
    def _default_trainable(self) -> StageSection:
        if self.trainable is None:
            object.__setattr__(self, "trainable", ["new"] if self.kind == "attention_transfer" else ["lora"])
        if not self.trainable:
            raise ValueError("trainable is empty: name 'new', 'lora' or both")
        if self.kd_ratio and self.kind != "lora":
            raise ValueError(
                "kd_ratio applies to lora stages only (attention_transfer already learns from the original)"
            )
        if self.mse_factor != MSE_FACTOR and self.kind != "attention_transfer":  # the default: a resolved recipe's
            raise ValueError(
                "mse_factor applies to attention_transfer stages only (a lora stage's loss is the next-token loss); "
                "remove it"
            )
        return self


class TrainingSection(Section):
    micro_batch_size: int = Field(1, ge=1, description="sequences per forward pass on each process")
    grad_accum: int = Field(8, ge=1, description="micro-batches per optimizer step on each process")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute decoder layers in backward to save memory (lora stages: attention transfer holds one "
        "layer's graph at a time already)",
    )
    autocast: Literal["bfloat16"] | None = Field(
        None,
        description="run the forward's matrix products in this dtype under torch.autocast, weights and optimizer "
        "state staying in model.dtype: several times faster on GPUs and on CPUs with AMX (null: in model.dtype). "
        "Attention kernels keep their own precision",
    )
    max_grad_norm: float | None = Field(None, gt=0, description="clip the gradient norm to this value (null: no clip)")
    eval_every: int = Field(50, ge=1, description="optimizer steps between held-out evaluations")
    eval_batches: int = Field(8, ge=1, description="held-out micro-batches per evaluation")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept on disk")
    seed: int = Field(
        0, description="seed of LoRA initialisation, data order, dropout and which documents data.held_out holds out"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (replicated model) or fsdp (FSDP2, shards the lora stage)"
    )


class OutputSection(Section):
    dir: str = Field("runs/linearize", description="run folder: checkpoints, metrics.jsonl and the final model/")
    merge_lora: bool = Field(True, description="merge LoRA into the saved weights (false: keep the adapter)")
    push_to_hub: str | None = Field(
        None, description="ORG/NAME: push the finished model/ to the Hugging Face Hub (as `linearize push` does)"
    )
    private: bool = Field(False, description="create the Hub repo private (with push_to_hub)")

    @field_validator("dir")
    @classmethod
    def _home_expanded(cls, value: str) -> str:
        return os.path.expanduser(value)  # YAML leaves '~' as it is: the run would go to a folder named '~'

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id_form(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_repo_id(value)
            except LinearizeError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _private_with_a_push(self) -> OutputSection:
        if self.private and self.push_to_hub is None:  # false, the default, is what a resolved recipe writes
            raise ValueError(
                "output.private makes the Hub repo that output.push_to_hub creates private, and push_to_hub is not "
                "set: nothing is pushed; set push_to_hub: ORG/NAME, or remove private"
            )
        return self


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    conversion: ConversionSection = Field(default_factory=ConversionSection)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    stages: list[StageSection] = Field(min_length=1, description="run in order")
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _stages_fit_method(self) -> Recipe:
        method = get_method(self.conversion.method)
        exact = method.exact_with(method_settings(method.name, **self.conversion.options()))
        trains_lora = any("lora" in stage.trainable for stage in self.stages)
        if self.output.push_to_hub and not self.output.merge_lora and trains_lora:
            raise ValueError(
                "output.push_to_hub publishes model/, which with merge_lora: false holds the model without its "
                "LoRA adapter (that goes to adapter/); set merge_lora: true to push the fine-tuned model"
            )
        for i, stage in enumerate(self.stages):
            if "new" in stage.trainable and not method.adds_parameters:
                raise ValueError(
                    f"stages.{i}.trainable: method '{method.name}' adds no parameters, so 'new' has nothing to "
                    "train; use trainable: [lora] (LoRA on the attention projections learns the transfer)"
                )
            if i == 0 and self.conversion.selects_after_transfer and stage.kind != "attention_transfer":
                raise ValueError(
                    "conversion.selection.after: attention_transfer scores layers once the attention_transfer stages "
                    "that open the recipe are done, and stages.0 is a lora stage; put an attention_transfer stage "
                    "first, or select at conversion (after: conversion)"
                )
            if stage.kind == "attention_transfer" and exact:
                raise ValueError(
                    f"stages.{i}: method '{method.name}' without a window computes the original attention exactly "
                    "at conversion, so attention transfer has zero loss and zero gradient; train its new parameters "
                    "in a lora stage (kind: lora, trainable: [lora, new])"
                )
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with each key once per mapping: a key written twice would silently keep the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the parent class says what is wrong with it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is written twice in one section; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise RecipeError(f"{where}: malformed YAML: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{source}: malformed YAML: {error}") from None


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{key}': '{part}' is not an index of a {len(node)}-item list")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                # a list the recipe leaves to its default has no item to set; any other key (a typo among them)
                # becomes a section that validation names, with the nearest valid key
                if parts[i + 1].isdigit() and _is_list_field(parts[: i + 1]):
                    _no_list_to_index(key, ".".join(parts[: i + 1]))
                node[part] = {}
            node = node[part]


def _is_list_field(parts: list[str]) -> bool:
    """Whether the dotted path `parts` names a recipe field that holds a list (`stages`, `data.sources`, a stage's
    `trainable`, which may also be null)."""
    owner = _model_at(tuple(int(p) if p.isdigit() else p for p in parts))
    field = owner.model_fields.get(parts[-1]) if owner else None
    annotations = (field.annotation, *typing.get_args(field.annotation)) if field else ()
    return any(typing.get_origin(a) is list for a in annotations)


def _no_list_to_index(key: str, path: str) -> None:
    raise RecipeError(
        f"override '{key}': the recipe does not write {path} (its default applies), so it has no item to set; "
        f"give the whole list, e.g. {path}=[...]"
    )


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML; `stages.0.epochs=2` indexes lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override '{item}' is not key=value (e.g. stages.0.optimizer.lr=1e-4)")
        _set_dotted(tree, key.strip(), _read_yaml(raw, f"override '{item}'"))
    return tree


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (its parent location)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _nested_key(owner: type[BaseModel] | None, key: str) -> list[str]:
    """['optimizer.lr'] for `lr` written in a stage: the key, by its exact name, one section further down
    ('stages.N.max_steps' for a section that is a list)."""
    for name, field in owner.model_fields.items() if owner else ():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and key in candidate.model_fields:
                return [f"{name}.N.{key}" if typing.get_origin(field.annotation) is list else f"{name}.{key}"]
    return []


def _recipe_loc(loc: tuple) -> tuple:
    """`loc` as the recipe's keys: past a key that holds no section, pydantic names the type of a union that failed
    (`data.held_out.float`), which no recipe writes; list indices stay."""
    model: Any = Recipe  # the section reached so far; None below a value, False below an unknown key
    keys = []
    for part in loc:
        if isinstance(part, str) and model is None:  # a union member's type, below a value
            continue
        keys.append(part)
        if isinstance(part, int) or not isinstance(model, type):
            continue
        field = model.model_fields.get(part)
        if field is None:  # an unknown key: whatever follows is the user's own
            model = False
            continue
        annotation = field.annotation
        sections = [
            a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        model = sections[0] if sections else None
    return tuple(keys)


def _quote_hint(item: dict, path: str) -> str:
    """How to write text that YAML read as a number or a bool (a commit of digits, `1.0`, `yes`), or ''."""
    value = item.get("input")
    if item["type"] != "string_type" or not isinstance(value, int | float):
        return ""
    what = str(value).lower() if isinstance(value, bool) else "a number"
    return f"; YAML reads it unquoted as {what}: write it in quotes (in an override: {path}=\"'...'\")"


def _explain(error: ValidationError, source: str) -> RecipeError:
    lines = []
    for item in error.errors():
        loc = _recipe_loc(tuple(item["loc"]))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = list(owner.model_fields) if owner else []
            near = _nested_key(owner, str(loc[-1])) or difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            lines.append(f"  {path}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        elif not loc or item["msg"].startswith(f"Value error, {path}."):  # the message names the keys
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "value_error":  # our own validators' words, about the section as a whole or a value
            got = "" if isinstance(item.get("input"), dict) else f" (got {item.get('input')!r})"
            lines.append(f"  {path}: {item['msg'].removeprefix('Value error, ')}{got}")
        elif lines and lines[-1].startswith(f"  {path}: "):  # another type of the same key: one line says both
            got = f" (got {item.get('input')!r})"
            if item["msg"] not in lines[-1]:
                lines[-1] = lines[-1].removesuffix(got) + f"; or {item['msg'][0].lower()}{item['msg'][1:]}{got}"
        else:
            lines.append(f"  {path}: {item['msg']}{_quote_hint(item, path)} (got {item.get('input')!r})")
    return RecipeError(f"{source} is not a valid recipe:\n" + "\n".join(lines))


def parse_recipe(text: str, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe YAML text (plus overrides) into a `Recipe`."""
    tree = _read_yaml(text, source)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (model, conversion, data, stages, ...)")
    tree = apply_overrides(tree, overrides or [])
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        raise _explain(error, source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"'{path}' is a folder; give the recipe's YAML file (e.g. {path / 'recipe.yaml'})")
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist; `linearize recipe init` prints one to start from")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"recipe file '{path}' is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start} cannot be decoded): a recipe is a YAML text file; check the path, or start from "
            "`linearize recipe init`"
        ) from None
    except OSError as error:  # no read permission, an I/O error
        raise RecipeError(
            f"cannot read recipe file '{path}': {error.strerror or error}; check that it is readable"
        ) from None
    return parse_recipe(text, str(path), overrides)


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML (what a run saves beside its outputs)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
