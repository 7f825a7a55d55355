"""The first run: what linearize does to the embedded SmolLM2-135M-Instruct, in about five minutes on two CPU cores.

Three conversions of the same model are measured side by side with the original:
- `swa` (sliding window + sinks), the training-free baseline: a constant-size cache, no training;
- Parallax, exact at conversion: the original's perplexity, before any training;
- Liger, through a short LoRA fine-tune (QUICK_RECIPE): its held-out perplexity falls while the bar runs, and the
  saved folder is loaded back through transformers to answer a question.
The table reports perplexity on the test split of the built-in English corpus (never trained on; what
`linearize eval --text builtin` measures), the cache one sequence needs at 8K tokens (from the models' configs,
exact) and decode speed after a 2K-token prefill (measured in this run, all models on the same tokens).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import sources
from .benchmark import measure
from .convert import ConversionPlan, convert_model, plan_conversion
from .errors import LinearizeError
from .evaluation import perplexity_of_windows, text_windows
from .generation import generate, load_for_inference
from .outputs import check_output_folder, replaced_when_done

QUESTION = "What is the capital of France?"
CACHE_CONTEXT = 8192  # tokens at which the cache column is computed
DECODE_CONTEXT = 2048  # tokens prefilled before decode steps are timed
DECODE_STEPS = 8
PERPLEXITY_WINDOWS = 4
ANSWERING = ("original", "swa", "liger fine-tuned")  # the models that answer QUESTION

# Liger on the embedded model, LoRA only, the window branch weighted 0.9 as in recipes/smollm2-135m-liger.yaml (see
# its header for why): short enough for the demo, long enough to show the held-out perplexity fall.
QUICK_RECIPE = """\
model:
  name: null            # the embedded SmolLM2-135M-Instruct
  dtype: float32
conversion:
  method: liger
  window: 64
  sinks: 4
  mix: 0.9              # the window branch's weight; the gated linear branch gets 0.1
data:
  sources:
    - builtin: english
  seq_len: 512
  held_out: 4           # documents kept out of training for the run's evaluations
lora:
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
stages:
  - kind: lora
    max_steps: {steps}
    optimizer: {{name: adamw, lr: 0.002}}
    schedule: {{kind: cosine, warmup_steps: {warmup}}}
training:
  micro_batch_size: 1
  grad_accum: 1         # one 512-token sequence per step
  eval_every: {eval_every}
  eval_batches: 4
  checkpoint_every: {steps}
  seed: 0
output:
  dir: {run}
  merge_lora: true
"""


@dataclass
class DemoRow:
    label: str
    perplexity: float
    cache_bytes: int  # one sequence at CACHE_CONTEXT tokens
    cache_grows: bool
    decode_ms: float | None = None


@dataclass
class DemoResult:
    rows: list[DemoRow]
    answers: dict[str, str]  # model label -> its answer to QUESTION
    model_folder: Path  # the fine-tuned model


def quick_recipe(run: Path, steps: int, model: str | None = None):
    """QUICK_RECIPE with `steps` LoRA steps, its run folder at `run`, on `model` (None: the embedded one)."""
    from .training.recipe import parse_recipe

    if steps < 1:
        raise LinearizeError(f"--steps must be at least 1, got {steps}")
    text = QUICK_RECIPE.format(
        steps=steps, warmup=min(2, steps - 1), eval_every=max(1, steps // 3), run=_yaml_string(run.as_posix())
    )  # warmup shorter than the stage, however few its steps
    overrides = [f"model.name={_yaml_string(model)}"] if model else None
    return parse_recipe(text, source="the demo recipe", overrides=overrides)


def _yaml_string(text: str) -> str:
    """`text` as a quoted YAML scalar: unquoted, a path's ` #` starts a comment and `: `, `[`, `*` or `%` YAML."""
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted one


def _cache(plan: ConversionPlan) -> tuple[int, bool]:
    """The converted model's cache bytes at CACHE_CONTEXT tokens, and whether it grows with the context."""
    at = plan.converted_cache_bytes(CACHE_CONTEXT)
    return at, plan.converted_cache_bytes(2 * CACHE_CONTEXT) > at


def run_demo(
    out: Path,
    steps: int = 30,
    force: bool = False,
    model: str | None = None,
    say: Callable[[str], None] | None = None,
    quiet: bool = False,
    console=None,
) -> DemoResult:
    """Convert, fine-tune and compare as the module docstring says; the fine-tune's run folder is `out`/liger-run.

    Args:
        out: the demo's folder (replaced with force=True).
        steps: LoRA steps of the Liger fine-tune (512 tokens each).
        model: the source model (None: the embedded SmolLM2-135M-Instruct).
        say: where progress messages go (None: standard error, unless `quiet`).
        quiet, console: passed to the fine-tune's progress reporting.
    """
    from .training.trainer import finetune

    if say is None:
        say = (lambda _: None) if quiet else functools.partial(print, file=sys.stderr)
    out = Path(out).expanduser()
    check_output_folder(out, force, source=model)
    run = out / "liger-run"
    recipe = quick_recipe(run, steps, model)
    with replaced_when_done(out, force):  # an earlier demo's folder is deleted only once this one is complete
        say(f"Loading {model or sources.EMBEDDED_NAME}")
        original, tokenizer = sources.load(model, dtype="float32")
        name = model or sources.EMBEDDED_NAME
        windows = text_windows("builtin", tokenizer, recipe.data.seq_len, PERPLEXITY_WINDOWS)

        plans = {m: plan_conversion(original.config, name, m, dtype="float32") for m in ("swa", "parallax")}
        plans["liger"] = recipe.conversion.plan(original.config, name)
        models = {"original": original} | {m: convert_model(original, plans[m].config) for m in ("swa", "parallax")}
        liger_at_conversion = convert_model(original, plans["liger"].config)

        say("Measuring perplexity at conversion (held-out text)")
        perplexities = {label: perplexity_of_windows(model, windows) for label, model in models.items()}
        perplexities["liger at conversion"] = perplexity_of_windows(liger_at_conversion, windows)
        del liger_at_conversion

        say(f"Fine-tuning Liger: {steps} LoRA steps of {recipe.data.seq_len} tokens")
        folder = finetune(recipe, quiet=quiet, console=console)
        models["liger fine-tuned"], _ = load_for_inference(str(folder), device="cpu")
        perplexities["liger fine-tuned"] = perplexity_of_windows(models["liger fine-tuned"], windows)

        say(f"Timing decode after a {DECODE_CONTEXT}-token prefill")
        speed = measure(models, DECODE_CONTEXT, DECODE_STEPS, repeats=1)
        answers = {label: generate(models[label], tokenizer, QUESTION, max_new_tokens=24) for label in ANSWERING}

        caches = {"original": (plans["swa"].kv_cache_bytes(CACHE_CONTEXT), True)}
        caches |= {label: _cache(plans[label.split()[0]]) for label in perplexities if label != "original"}
        rows = [
            DemoRow(label, ppl, *caches[label], speed.get(label, {}).get("decode_ms"))
            for label, ppl in perplexities.items()
        ]
        return DemoResult(rows, answers, folder)
