"""Optimizers and learning-rate schedules of a stage."""

from __future__ import annotations

import math

import torch

from ..errors import LinearizeError
from .recipe import OptimizerSection, ScheduleSection


def build_optimizers(
    params: list[torch.nn.Parameter], config: OptimizerSection, new_params: list[torch.nn.Parameter] = ()
) -> list[torch.optim.Optimizer]:
    """AdamW over everything, or Muon over the 2-D weights plus AdamW over the rest (Muon orthogonalises
    matrix updates and is undefined for vectors). Both get the stage's peak lr; those of `params` that are in
    `new_params` (parameters the method adds) get `new_lr` when the recipe sets it."""
    added = {id(p) for p in new_params}

    def groups(subset: list[torch.nn.Parameter]) -> list[dict]:
        base = {"params": [p for p in subset if id(p) not in added], "lr": config.lr}
        new = {"params": [p for p in subset if id(p) in added], "lr": config.new_lr or config.lr}
        return [g for g in (base, new) if g["params"]]

    adamw = dict(betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return [torch.optim.AdamW(groups(params), **adamw)]
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise LinearizeError(
            f"optimizer 'muon' needs torch.optim.Muon, which torch {torch.__version__} lacks; "
            "upgrade torch (it ships from 2.9) or use optimizer.name: adamw"
        )
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    optimizers = []
    if matrices:
        optimizers.append(
            muon_class(
                groups(matrices),
                weight_decay=config.weight_decay,
                momentum=config.muon_momentum,
                adjust_lr_fn=config.muon_lr_adjust,
            )
        )
    if others:
        optimizers.append(torch.optim.AdamW(groups(others), **adamw))
    return optimizers


def lr_factor(step: int, total_steps: int, config: ScheduleSection) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], total_steps: int, config: ScheduleSection
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, config)) for opt in optimizers
    ]
