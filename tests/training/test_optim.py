"""The optimizers and schedules of a stage (`linearize.training.optim`): AdamW and Muon, the method's new
parameters at their own learning rate or with their own optimizer, warm-up and cosine decay."""

import pytest
import torch

from linearize.training.optim import build_optimizers, lr_factor
from linearize.training.recipe import OptimizerSection, ScheduleSection


def test_schedule_and_optimizers():
    warmup_cosine = ScheduleSection(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(step, 10, warmup_cosine) for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] > 0.1 and factors[-1] < factors[3]
    assert lr_factor(5, 10, ScheduleSection(kind="constant")) == 1.0
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    (adamw,) = build_optimizers(params, OptimizerSection(name="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)
    muon, rest = build_optimizers(params, OptimizerSection(name="muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(rest, torch.optim.AdamW)
    assert muon.param_groups[0]["params"] == [params[0]] and rest.param_groups[0]["params"] == [params[1]]
    assert muon.defaults["adjust_lr_fn"] == "match_rms_adamw"


def placement(params, config, new_params) -> dict[int, tuple[str, float]]:
    """Each parameter's optimizer and lr, by the parameter's id."""
    return {
        id(p): (type(optimizer).__name__, group["lr"])
        for optimizer in build_optimizers(params, config, new_params=new_params)
        for group in optimizer.param_groups
        for p in group["params"]
    }


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_new_parameters_get_their_own_learning_rate(name):
    lora, probe, bias = (torch.nn.Parameter(torch.zeros(*shape)) for shape in ((4, 3), (5, 3), (3,)))
    config = OptimizerSection(name=name, lr=1e-3, new_lr=5e-3)
    lrs = {key: lr for key, (_, lr) in placement([lora, probe, bias], config, [probe, bias]).items()}
    assert lrs == {id(lora): 1e-3, id(probe): 5e-3, id(bias): 5e-3}
    (plain,) = build_optimizers([lora, probe], OptimizerSection(lr=1e-3), new_params=[probe])
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]  # no new_lr: one lr for all


def test_new_parameters_may_get_their_own_optimizer():
    """`new_name: muon` beside `name: adamw`: the method's new matrices train with Muon, its new vectors and
    everything else (LoRA) with AdamW, each at its own lr; and the other way round."""
    lora, lora_bias, probe, probe_bias = (torch.nn.Parameter(torch.zeros(*s)) for s in ((4, 3), (4,), (5, 3), (5,)))
    params, new = [lora, lora_bias, probe, probe_bias], [probe, probe_bias]

    mixed_config = OptimizerSection(name="adamw", new_name="muon", lr=1e-3, new_lr=5e-3)
    first = build_optimizers(params, mixed_config, new_params=new)[0]
    assert first.param_groups[0]["params"][0] is lora  # the stage's own optimizer first, as checkpoints hold them
    mixed = placement(params, mixed_config, new)
    assert mixed == {
        id(lora): ("AdamW", 1e-3), id(lora_bias): ("AdamW", 1e-3), id(probe): ("Muon", 5e-3),
        id(probe_bias): ("AdamW", 5e-3),
    }  # fmt: skip
    reverse = placement(params, OptimizerSection(name="muon", new_name="adamw", lr=1e-3), new)
    assert reverse == {
        id(lora): ("Muon", 1e-3), id(lora_bias): ("AdamW", 1e-3), id(probe): ("AdamW", 1e-3),
        id(probe_bias): ("AdamW", 1e-3),
    }  # fmt: skip
