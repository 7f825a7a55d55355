"""Optimizers and learning-rate schedules of a stage."""

from __future__ import annotations

import math

import torch

from ..errors import LinearizeError
from .recipe import OptimizerSection, ScheduleSection


def build_optimizers(
    params: list[torch.nn.Parameter], config: OptimizerSection, new_params: list[torch.nn.Parameter] = ()
) -> list[torch.optim.Optimizer]:
    """The stage's optimizers: `name` over `params`, except those in `new_params` (parameters the method adds),
    which get `new_name` and `new_lr` where the recipe sets them. AdamW takes whatever it is given; Muon takes
    the 2-D weights and leaves the rest to AdamW (it orthogonalises matrix updates and is undefined for vectors)."""
    added = {id(p) for p in new_params}
    groups: dict[str, list[dict]] = {"muon": [], "adamw": []}  # optimizer -> its parameter groups
    for name, lr, subset in (
        (config.name, config.lr, [p for p in params if id(p) not in added]),
        (config.new_name or config.name, config.new_lr or config.lr, [p for p in params if id(p) in added]),
    ):
        if name == "muon":
            groups["muon"].append({"params": [p for p in subset if p.ndim == 2], "lr": lr})
            subset = [p for p in subset if p.ndim != 2]
        groups["adamw"].append({"params": subset, "lr": lr})
    optimizers = {}
    if muon_groups := [g for g in groups["muon"] if g["params"]]:
        muon_class = getattr(torch.optim, "Muon", None)
        if muon_class is None:
            raise LinearizeError(
                f"optimizer 'muon' needs torch.optim.Muon, which torch {torch.__version__} lacks; "
                "upgrade torch (it ships from 2.9) or set optimizer.name (and new_name) to adamw"
            )
        optimizers["muon"] = muon_class(
            muon_groups,
            weight_decay=config.weight_decay,
            momentum=config.muon_momentum,
            adjust_lr_fn=config.muon_lr_adjust,
        )
    if adamw_groups := [g for g in groups["adamw"] if g["params"]]:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, betas=config.betas, weight_decay=config.weight_decay)
    # the stage's own optimizer first, then the added parameters' own: checkpoints hold their states in this order
    first = optimizers.pop(config.name, None)
    return ([first] if first else []) + list(optimizers.values())


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
