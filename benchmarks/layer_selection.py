"""Which layers to keep as softmax attention: `auto:K` with each scorer against `every:N` and K random layers, each
after the same recipe, on held-out text.

    python benchmarks/layer_selection.py --recipe recipes/smollm2-135m-liger.yaml --text wikitext2_valid.txt \\
        [--k 5] [--every 6] [--seed 0] [--variants auto-loss,auto-output,every,random] [--no-scoring-cost] \\
        [--json out.json] [key=value ...]

First (unless `--no-scoring-cost`) the cost of scoring: the recipe's conversion with every layer converted, scored
once by each scorer as the recipe does at conversion (seconds on `--threads` threads, with the layers each one
keeps). Then every variant runs the recipe in its own folder (`<output.dir>-<variant>`, reused when its model is
there, refused when another recipe, another --k or --every, trained it) with `conversion.softmax_layers` set, and
the trained models are measured next to the original: perplexity over `--windows` x `--context` tokens of `--text`
(never trained on), perplexity by position over `--long-windows` x `--long-context` tokens in stretches of
`--block`, and passkey retrieval at `--passkey-contexts` (`--trials` keys at each of 5 depths). `key=value`
overrides apply to every variant's recipe. A variant `auto-SCORER` chooses K layers by the recipe's own selection
rule (its `spread`, its `after`) with SCORER; `auto-SCORER-spread` keeps the worst of each K-th of the depth.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from conversion_quality import (  # beside this file
    add_measurement_arguments,
    held_out_windows,
    measure_by_position,
    trained,
    write_json,
)

import linearize  # noqa: F401  (registers the converted model class)
from linearize import sources
from linearize.convert import convert_model
from linearize.evaluation import eval_rows, evaluate_models
from linearize.selection import SCORERS, select_layers
from linearize.training.recipe import SelectionSection, load_recipe

SPREAD = "-spread"  # a variant name's suffix: the best layer of each K-th of the depth (`--spread-layers`)


def variant_layers(variants: list[str], k: int, every: int, num_layers: int, seed: int) -> dict[str, str]:
    """Each variant's `conversion.softmax_layers` value."""
    specs = {f"auto-{scorer}{spread}": f"auto:{k}" for scorer in SCORERS for spread in ("", SPREAD)}
    specs["every"] = f"every:{every}"
    specs["random"] = ",".join(map(str, sorted(random.Random(seed).sample(range(num_layers), k))))
    unknown = set(variants) - set(specs)
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(specs)}")
    return {name: specs[name] for name in variants}


def variant_overrides(name: str, spec: str) -> list[str]:
    """The recipe overrides of variant `name` whose `conversion.softmax_layers` is `spec`."""
    if not name.startswith("auto-"):
        return [f"conversion.softmax_layers={spec}", "conversion.selection=null"]  # a selection needs auto:K
    scorer = name.removeprefix("auto-").removesuffix(SPREAD)
    spread = ["conversion.selection.spread=true"] if name.endswith(SPREAD) else []  # else the recipe's own rule
    return [f"conversion.softmax_layers={spec}", f"conversion.selection.scorer={scorer}", *spread]


def scoring_cost(recipe, k: int) -> dict[str, dict]:
    """Each scorer on the recipe's conversion with every layer converted: seconds, scores and kept layers."""
    source, tokenizer = sources.load(recipe.model.name, dtype=recipe.model.dtype, revision=recipe.model.revision)
    spec = recipe.conversion.model_copy(update={"softmax_layers": f"auto:{k}"})
    model = convert_model(source, spec.plan(source.config, recipe.model.name or sources.EMBEDDED_NAME).config)
    settings = (recipe.conversion.selection or SelectionSection()).model_dump()  # calibration and windows as set
    costs = {}
    for scorer in SCORERS:
        section = SelectionSection(**{**settings, "scorer": scorer})
        request = spec.model_copy(update={"selection": section}).selection_request()
        started = time.perf_counter()
        selection = select_layers(model, tokenizer, request)
        costs[scorer] = {
            "seconds": time.perf_counter() - started,
            "layers": selection.layers,
            "scores": selection.scores,
            "calibration": selection.calibration,
        }
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--text", required=True, help="held-out text file (never in the training data)")
    parser.add_argument("--k", type=int, default=5, help="layers kept as softmax attention")
    parser.add_argument("--every", type=int, default=6, help="the every:N variant (N layers apart)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the random variant's layers")
    parser.add_argument("--variants", default="auto-loss,auto-output,every,random")
    parser.add_argument(
        "--scoring-cost", action=argparse.BooleanOptionalAction, default=True, help="time each scorer first"
    )
    add_measurement_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as for `linearize finetune`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe, args.overrides)
    original, tokenizer = sources.load(recipe.model.name, dtype="float32", revision=recipe.model.revision)
    windows, long_windows = held_out_windows(args, recipe, tokenizer)  # before the variants train (hours)
    num_layers = original.config.num_hidden_layers
    layers = variant_layers(args.variants.split(","), args.k, args.every, num_layers, args.seed)

    costs = scoring_cost(recipe, args.k) if args.scoring_cost else {}
    if costs:
        print(f"\nscoring cost ({args.threads} threads, {num_layers} layers)")
    for scorer, cost in costs.items():
        print(f"  {scorer}: {cost['seconds']:.0f} s on {cost['calibration']}; keeps layers {cost['layers']}")

    models, minutes = {"original": original.eval()}, {}
    for name, spec in layers.items():
        run = json.dumps(f"{recipe.output.dir}-{name}")  # quoted: a folder's ` #` would start a YAML comment
        overrides = [*args.overrides, *variant_overrides(name, spec), f"output.dir={run}"]
        models[name], minutes[name] = trained(load_recipe(args.recipe, overrides))
    kept = {name: model.config.linearize["softmax_layers"] for name, model in models.items() if name != "original"}

    quality = evaluate_models(
        models,
        tokenizer,
        args.text,
        args.context,
        args.windows,
        [int(c) for c in args.passkey_contexts.split(",")],
        {"trials": args.trials},
        text_ids=windows,
    )
    header, rows = eval_rows(quality)
    print(f"\n{args.recipe} ({' '.join(args.overrides)}), held-out text {args.text}")
    for name, value in kept.items():
        print(f"  {name}: layers {value}" + (f", fine-tuned in {minutes[name]:.1f} min" if minutes[name] else ""))
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    by_position = measure_by_position(models, long_windows, args)
    if args.json:
        results = {"scoring": costs, "kept": kept, "quality": quality, "by_position": by_position}
        write_json(args.json, results | {"train_minutes": minutes, "args": vars(args)})


if __name__ == "__main__":
    main()
