"""The commented starting recipe of each method: what `linearize recipe init` prints or writes."""

from __future__ import annotations

from pathlib import Path

from ..methods import describe_parameter, get_method
from .recipe import RecipeError

_TEMPLATE = """\
# linearize fine-tuning recipe ({method}).
# Run:       linearize finetune RECIPE.yaml
# Override:  linearize finetune RECIPE.yaml stages.0.optimizer.lr=1e-3 training.grad_accum=4
# Check:     linearize recipe validate RECIPE.yaml

model:
  name: null            # hub id or local folder; null or embedded = the embedded SmolLM2-135M-Instruct (offline)
  revision: null
  dtype: float32        # float32 on CPU; bfloat16 on a GPU

conversion:
  method: {method}
{options}  softmax_layers: ""    # layers kept as softmax attention, e.g. "0,8,16", "every:8" or "auto:4"
  selection: null       # with auto:K, e.g. {{scorer: loss, calibration: builtin, windows: 4, after: conversion,
                        #   spread: false}} (spread: the best layer of each K-th of the depth; a number S: of S
                        #   stretches, then the K - S highest-scoring others)

data:
  sources:
    - builtin: english  # or: path: data/*.jsonl  |  dataset: yahma/alpaca-cleaned
      format: auto      # text, instruction (alpaca fields) or chat (messages); auto detects
  seq_len: 1024         # tokens per packed training sequence
  held_out: 0.05        # fraction (or number) of documents kept for evaluation
  document_boundaries: true  # documents of a pack do not see each other (false: run together, as Liger/LoLCATs)

lora:
  r: 8
  alpha: 8
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj]

stages:
{stages}
training:
  micro_batch_size: 1
  grad_accum: 8         # sequences per optimizer step = micro_batch_size * grad_accum * processes
  gradient_checkpointing: false
  autocast: null        # bfloat16: matrix products in bf16, weights fp32 (GPUs; CPUs with AMX: several times faster)
  max_grad_norm: null
  eval_every: 50
  checkpoint_every: 50
  seed: 0

output:
  dir: runs/{method}
  merge_lora: true      # fold LoRA into the saved weights
"""

_TRANSFER_STAGE = """\
  - kind: attention_transfer  # match the original attention outputs layer by layer (MSE)
    trainable: [{trainable}]
    epochs: 1
    optimizer: {{name: adamw, lr: 0.01}}
"""
_LORA_STAGE = """\
  - kind: lora                # next-token loss, response tokens only for instruction/chat data
    trainable: [{trainable}]
    epochs: 1
    optimizer: {optimizer}
    schedule: {{kind: cosine, warmup_steps: 10}}
    kd_ratio: 0.0             # > 0: also distil the original model's next-token distribution (KL)
"""


def recipe_template(method: str) -> str:
    """A commented starting recipe for `method` (what `linearize recipe init` prints)."""
    spec = get_method(method)
    # the method's own parameters, each null (its default), commented with what it is and that default
    options = "".join(  # comments aligned with softmax_layers' in the template
        f"  {p.name}: null{' ' * (16 - len(p.name))}# {describe_parameter([(method, p)], named=False)}\n"
        for p in spec.settings.parameters()
    )
    if spec.exact_at_conversion:  # nothing to transfer: the new parameters train with LoRA on the next-token loss
        # the new parameters at LoRA's lr fit a small corpus at the cost of general text (recipes/*-parallax.yaml)
        optimizer = "{name: adamw, lr: 0.001, new_lr: 0.0001}  # new_lr: the added parameters'"
        stages = _LORA_STAGE.format(trainable="lora, new", optimizer=optimizer)
        return _TEMPLATE.format(method=method, options=options, stages=stages)
    # a method without new parameters learns the transfer through LoRA on q/k/v
    transfer = _TRANSFER_STAGE.format(trainable="new" if spec.adds_parameters else "lora")
    lora = _LORA_STAGE.format(trainable="lora", optimizer="{name: adamw, lr: 0.001}")
    return _TEMPLATE.format(method=method, options=options, stages=transfer + lora)


def write_recipe_template(path: str | Path, method: str, force: bool = False) -> Path:
    """Write `recipe_template(method)` to `path`, whole or not at all. An existing file, most likely a recipe
    edited since, is kept unless `force`."""
    from ..outputs import FORCE, check_writable, write_file

    path = Path(path).expanduser()  # a '~' the shell left as it is (`-o=~/my.yaml`)
    if path.is_dir():
        raise RecipeError(f"'{path}' is a folder; give the recipe file's path, e.g. {path / f'{method}.yaml'}")
    if path.exists() and not force:
        raise RecipeError(f"'{path}' already exists; choose another path, or pass {FORCE} to replace it")
    check_writable(path, what="recipe file")
    return write_file(path, recipe_template(method))
