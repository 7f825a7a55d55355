"""STILL after its CPU demo recipe next to Liger after its own, the original model and the training-free swa
baseline: held-out perplexity, passkey retrieval at 1K and 2K tokens, perplexity by position over 2K-token windows,
and decode ms/token and cache size at 512, 2048 and 8192 tokens, all measured in one run.

    python benchmarks/still_quality.py --text held_out.txt [--still recipes/smollm2-135m-still.yaml]
        [--liger recipes/smollm2-135m-liger.yaml] [--json out.json]

A recipe whose run folder holds no finished model is run first (its wall time is reported). Perplexity uses
`--windows` windows of `--context` tokens of `--text`, which training must never have seen; passkey retrieval
hides a 5-digit key at 5 depths, `--trials` keys each, and reports greedy accuracy and the rank of the true key
among 9 distractors. Perplexity by position scores `--long-windows` windows of `--long-context` tokens and reports
each stretch of `--block` positions apart: STILL's linear state does not decay, so a model trained on shorter
sequences than it is asked to read gets worse past its training length. STILL's cache grows by `topk` salient
tokens per chunk and head: the decode table shows how much.
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
from linearize.benchmark import run_bench
from linearize.convert import convert_model, plan_conversion
from linearize.evaluation import eval_rows, evaluate_models, perplexity_by_position, text_windows
from linearize.training.recipe import load_recipe
from linearize.training.trainer import finetune


def trained_model(recipe_path: str) -> tuple[torch.nn.Module, float | None]:
    """The recipe's fine-tuned model (running the recipe first when its run has not finished) and the minutes it
    took to train here (None when it was already there)."""
    recipe = load_recipe(recipe_path)
    folder = Path(recipe.output.dir) / "model"
    minutes = None
    if not folder.is_dir():
        start = time.perf_counter()
        finetune(recipe, resume=(Path(recipe.output.dir) / "linearize_recipe.yaml").exists())
        minutes = (time.perf_counter() - start) / 60
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="held-out text file (never in the training data)")
    parser.add_argument("--still", default="recipes/smollm2-135m-still.yaml")
    parser.add_argument("--liger", default="recipes/smollm2-135m-liger.yaml")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--passkey-contexts", default="1024,2048")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--long-context", type=int, default=2048, help="window length of perplexity by position")
    parser.add_argument("--long-windows", type=int, default=3)
    parser.add_argument("--block", type=int, default=512, help="positions per stretch of perplexity by position")
    parser.add_argument("--bench-contexts", default="512,2048,8192")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models, minutes = {}, {}
    models["still"], minutes["still"] = trained_model(args.still)
    models["liger"], minutes["liger"] = trained_model(args.liger)
    original, tokenizer, _ = sources.load(None, dtype="float32")
    models["original"] = original.eval()
    source, _, _ = sources.load(None, dtype="float32")
    plan = plan_conversion(source.config, sources.EMBEDDED_NAME, "swa", window=64, sinks=4)
    models["swa"] = convert_model(source, plan.config)

    passkey_contexts = [int(c) for c in args.passkey_contexts.split(",")]
    quality = evaluate_models(
        models, tokenizer, args.text, args.context, args.windows, passkey_contexts, {"trials": args.trials}
    )
    header, rows = eval_rows(quality)
    print(f"\nquality ({args.text}):")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))

    windows = text_windows(args.text, tokenizer, args.long_context, args.long_windows)
    by_position = {label: perplexity_by_position(model, windows, args.block) for label, model in models.items()}
    print(f"\nperplexity by position ({windows.shape[0]} windows of {args.long_context} tokens)")
    starts = range(0, args.long_context, args.block)
    print(f"{'model':>10} | " + " | ".join(f"{s}-{s + args.block}" for s in starts))
    for label, values in by_position.items():
        print(f"{label:>10} | " + " | ".join(f"{v:.2f}" for v in values))

    contexts = [int(c) for c in args.bench_contexts.split(",")]
    speed = run_bench({k: models[k] for k in ("still", "liger", "original")}, contexts, decode_tokens=16, repeats=1)
    print("\ncontext | decode ms/token still / liger / original | cache MiB still / liger / original")
    for row in speed["rows"]:
        decode = " / ".join(f"{row[k]['decode_ms']:.1f}" for k in speed["models"])
        cache = " / ".join(f"{row[k]['cache_bytes'] / 2**20:.2f}" for k in speed["models"])
        print(f"{row['context']:>7} | {decode:>40} | {cache}")
    for label, value in minutes.items():
        if value is not None:
            print(f"{label} fine-tuning wall time: {value:.1f} min ({args.threads} threads)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"quality": quality, "by_position": by_position, "speed": speed, "train_minutes": minutes},
                f,
                indent=2,
                default=str,
            )


if __name__ == "__main__":
    main()
