"""Quality recovered by fine-tuning: held-out perplexity of the original, the conversion before and after a recipe,
and the training-free sliding-window baseline, in one run.

    python benchmarks/finetune_quality.py --text held_out.txt [--recipe recipes/smollm2-135m-liger.yaml]
        [--context 512] [--windows 8] [--skip-training] [--json out.json] [key=value ...]

It runs the recipe (timing it, unless --skip-training reuses the run folder's finished model), then measures
perplexity on `--text`, which training must never have seen (for example WikiText-2 validation), with
`--windows` non-overlapping windows of `--context` tokens, each scored from an empty state. The baseline is
`swa` with 64-token windows and 4 sinks, converted from the same source model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401  (registers the converted model class)
from linearize import sources
from linearize.convert import convert_model, plan_conversion
from linearize.evaluation import perplexity
from linearize.training.recipe import load_recipe
from linearize.training.trainer import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="held-out text file (never in the training data)")
    parser.add_argument("--recipe", default="recipes/smollm2-135m-liger.yaml")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true", help="evaluate the run folder's existing model")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as for `linearize finetune`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.text).read_text()
    recipe = load_recipe(args.recipe, args.overrides)
    run = Path(recipe.output.dir)

    train_seconds = None
    if not args.skip_training:
        start = time.perf_counter()
        finetune(recipe, resume=(run / "linearize_recipe.yaml").exists())
        train_seconds = time.perf_counter() - start

    def score(model, tokenizer) -> float:
        return perplexity(model.float().eval(), tokenizer, text, args.context, args.windows)

    rows = {}
    name, conv = recipe.model.name, recipe.conversion
    original, tokenizer, _ = sources.load(name, dtype="float32", revision=recipe.model.revision)
    rows["original"] = score(original, tokenizer)
    source, _, _ = sources.load(name, dtype="float32", revision=recipe.model.revision)
    plan = plan_conversion(source.config, name or sources.EMBEDDED_NAME, "swa", window=64, sinks=4)
    rows["swa baseline (64 window, 4 sinks)"] = score(convert_model(source, plan.config), tokenizer)
    source, _, _ = sources.load(name, dtype="float32", revision=recipe.model.revision)
    plan = conv.plan(source.config, name or sources.EMBEDDED_NAME)
    rows[f"{conv.method}, before fine-tuning"] = score(convert_model(source, plan.config), tokenizer)
    tuned = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    rows[f"{conv.method}, after fine-tuning"] = score(tuned, AutoTokenizer.from_pretrained(run / "model"))

    print(f"\nheld-out perplexity: {args.text}, {args.windows} x {args.context} tokens")
    for label, value in rows.items():
        print(f"{label:>36} | {value:10.2f} | {value / rows['original']:6.2f}x original")
    if train_seconds is not None:
        print(f"fine-tuning wall time: {train_seconds / 60:.1f} min ({args.threads} threads)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"recipe": str(args.recipe), "perplexity": rows, "train_seconds": train_seconds}, f, indent=2)


if __name__ == "__main__":
    main()
