"""Where a fine-tuning step's time goes: one stage of a recipe, run by the trainer itself, profiled.

    python benchmarks/training_profile.py recipes/smollm2-135m-liger.yaml --stage 0 [--steps 3] [--threads 1] \\
        [key=value ...]

Builds the recipe's `Trainer` (model, conversion, data: what `linearize finetune` builds), then runs `--steps`
optimizer steps of stage `--stage` through `Trainer.run_stage` (evaluations and checkpoints left out) after one
warm-up step, under torch.profiler. A later stage starts from the model as built, with LoRA applied if an earlier
stage applied it: the work of a step does not depend on the weights. Prints the median step time (wall clock and
the process's CPU time, which other processes on a shared machine disturb less) and, per step, the time of each
part of the forward pass (module hooks: converted attention, with attention transfer's teacher and in-forward
backward inside it; softmax attention; MLP; lm_head), of the losses and their backward, of the backward of the
whole model (lora stages) and of the optimizer. key=value overrides apply to the recipe (e.g. training.autocast=null
for fp32, `conversion={method: swa, window: 64, sinks: 4}` for the swa baseline).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from linearize.layers.base import LinearizedAttention
from linearize.training import trainer as trainer_module
from linearize.training import transfer as transfer_module
from linearize.training.distributed import init_world
from linearize.training.recipe import load_recipe
from linearize.training.report import Reporter

# profiler keys (record_function labels below, and aten ops) -> the row they count in, in print order
ROWS = {
    "M:converted attention": "converted attention (forward; transfer: + teacher + backward)",
    "M:teacher": "  of which the teacher (transfer)",
    "M:softmax attention": "softmax attention (forward)",
    "M:mlp": "MLP (forward)",
    "M:lm_head": "lm_head (forward)",
    "aten::cross_entropy_loss": "next-token loss (forward)",
    "aten::kl_div": "distillation KL (forward)",
    "M:backward": "backward of the model (lora stages)",
    "Optimizer.step#AdamW.step": "optimizer step",
}


def build(recipe_path: str, overrides: list[str], run: Path):
    recipe = load_recipe(recipe_path, [*overrides, f"output.dir={run}"])
    world = init_world()
    reporter = Reporter(None, quiet=True)
    return trainer_module.Trainer(recipe, world, reporter, run)


def labelled(model: torch.nn.Module) -> None:
    """Name the profiler's ranges after the model's parts (forward hooks)."""

    def label(name: str, module: torch.nn.Module) -> str | None:
        if isinstance(module, LinearizedAttention):
            return "converted attention"
        if name.endswith("self_attn"):
            return "softmax attention"
        if type(module).__name__.endswith("MLP"):
            return "mlp"
        return "lm_head" if name.endswith("lm_head") else None

    for name, module in model.named_modules():
        if (part := label(name, module)) is not None:
            ranges = []

            def enter(m, a, part=part, ranges=ranges):
                ranges.append(record_function(f"M:{part}"))
                ranges[-1].__enter__()

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(lambda m, a, out, ranges=ranges: ranges.pop().__exit__(None, None, None))


def timed_stage(trainer, index: int, steps: int, clock) -> list[float]:
    """Seconds of each of `steps` steps of stage `index`, by `clock` (the trainer's own step timing)."""
    stage = trainer.recipe.stages[index].model_copy(update={"max_steps": steps})
    seconds = []
    trainer.reporter.record = lambda **fields: seconds.append(fields["seconds"]) if "seconds" in fields else None
    trainer.state.step = 0
    trainer_module.time = type("Clock", (), {"perf_counter": staticmethod(clock)})
    try:
        trainer.run_stage(index, stage, None)
    finally:
        trainer_module.time = time
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as run:
        trainer = build(args.recipe, args.overrides, Path(run))
        trainer._evaluate_and_record = lambda *a: None
        trainer.checkpoint = lambda *a: None
        if any("lora" in stage.trainable for stage in trainer.recipe.stages[: args.stage + 1]):
            trainer.apply_lora()
        trainer.state.stage = args.stage
        timed_stage(trainer, args.stage, 1, time.perf_counter)  # warm-up
        wall = timed_stage(trainer, args.stage, args.steps, time.perf_counter)
        cpu = timed_stage(trainer, args.stage, args.steps, time.process_time)
        labelled(trainer.model)
        teacher = transfer_module.teacher_attention

        def profiled_teacher(*a, **kw):
            with record_function("M:teacher"):
                return teacher(*a, **kw)

        backward = torch.Tensor.backward

        def profiled_backward(tensor, *a, **kw):
            with record_function("M:backward"):
                return backward(tensor, *a, **kw)

        transfer_module.teacher_attention = profiled_teacher
        torch.Tensor.backward = profiled_backward
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                profiled = timed_stage(trainer, args.stage, args.steps, time.perf_counter)
        finally:
            transfer_module.teacher_attention, torch.Tensor.backward = teacher, backward
    stage = trainer.recipe.stages[args.stage]
    print(f"{args.recipe} stage {args.stage} ({stage.kind}, trainable {stage.trainable}), {args.threads} thread(s)")
    print(f"step: {statistics.median(wall):.2f} s wall, {statistics.median(cpu):.2f} s CPU (median of {args.steps})")
    print(f"under the profiler: {statistics.median(profiled):.2f} s a step; per step:")
    totals = {}
    for event in prof.key_averages():
        if event.key in ROWS:
            totals[event.key] = event.cpu_time_total / 1e6 / args.steps
    # a teacher called per group of packed documents calls itself: count its outermost ranges only
    outer = [e for e in prof.events() if e.name == "M:teacher"]
    outer = [e for e in outer if not any(o is not e and o.time_range.start <= e.time_range.start and
                                         e.time_range.end <= o.time_range.end for o in outer)]  # fmt: skip
    if outer:
        totals["M:teacher"] = sum(e.cpu_time_total for e in outer) / 1e6 / args.steps
    if "M:backward" in totals and stage.kind == "attention_transfer":  # inside the converted attention: counted there
        del totals["M:backward"]
    for key, row in ROWS.items():
        if key in totals:
            print(f"  {row:<62s} {totals[key]:7.2f} s")


if __name__ == "__main__":
    main()
