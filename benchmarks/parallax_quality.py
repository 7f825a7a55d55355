"""Parallax after its CPU demo recipe, once with AdamW and once with Muon, next to the fair control: the original
fine-tuned with plain LoRA on the same data, steps and learning rates (the same recipe with the probe frozen at
zero, which is the original model exactly). Held-out perplexity and passkey retrieval at 1K and 2K tokens.

    python benchmarks/parallax_quality.py --text held_out.txt [--recipe recipes/smollm2-135m-parallax.yaml]
        [--runs control-adamw,parallax-adamw,parallax-muon] [--json out.json] [key=value ...]

Each run trains in its own folder (`runs/parallax-quality/<run>`) unless a finished model is already there; its
wall time is reported. `key=value` overrides apply to every run (e.g. stages.0.max_steps=60 for a shorter
comparison). Perplexity uses `--windows` windows of `--context` tokens of `--text`, which training must never
have seen; passkey retrieval hides a 5-digit key at 5 depths, `--trials` keys each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import linearize  # noqa: F401  (registers the converted model class)
from linearize import sources
from linearize.evaluation import eval_rows, evaluate_models
from linearize.training.recipe import load_recipe
from linearize.training.trainer import finetune

# run name -> what trains and with which optimizer
RUNS = {
    "control-adamw": ("lora", "adamw"),
    "control-muon": ("lora", "muon"),
    "parallax-adamw": ("lora,new", "adamw"),
    "parallax-muon": ("lora,new", "muon"),
}


def trained_model(recipe_path: str, run: str, overrides: list[str], root: Path):
    """The run's fine-tuned model (training it first unless it has finished) and its training minutes (None when
    it was already there)."""
    trainable, optimizer = RUNS[run]
    recipe = load_recipe(
        recipe_path,
        [*overrides, f"stages.0.trainable=[{trainable}]", f"stages.0.optimizer.name={optimizer}"]
        + [f"output.dir={root / run}"],
    )
    folder = root / run / "model"
    minutes = None
    if not folder.is_dir():
        start = time.perf_counter()
        finetune(recipe, resume=(root / run / "linearize_recipe.yaml").exists())
        minutes = (time.perf_counter() - start) / 60
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="held-out text file (never in the training data)")
    parser.add_argument("--recipe", default="recipes/smollm2-135m-parallax.yaml")
    parser.add_argument("--runs", default="control-adamw,parallax-adamw,parallax-muon", help=", ".join(RUNS))
    parser.add_argument("--root", default="runs/parallax-quality", help="folder of the runs")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--passkey-contexts", default="1024,2048", help="'none' skips passkey retrieval")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, as for `linearize finetune`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")

    passkey_contexts = [] if args.passkey_contexts == "none" else [int(c) for c in args.passkey_contexts.split(",")]
    original, tokenizer, _ = sources.load(None, dtype="float32")
    models, minutes = {"original": original.eval()}, {}
    for run in runs:
        models[run], minutes[run] = trained_model(args.recipe, run, args.overrides, Path(args.root))

    quality = evaluate_models(
        models, tokenizer, args.text, args.context, args.windows, passkey_contexts, {"trials": args.trials}
    )
    header, rows = eval_rows(quality)
    print(f"\nquality ({args.text}):")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    for label, value in minutes.items():
        if value is not None:
            print(f"{label} fine-tuning wall time: {value:.1f} min ({args.threads} threads)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"quality": quality, "train_minutes": minutes, "runs": runs}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
