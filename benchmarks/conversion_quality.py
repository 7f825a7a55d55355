"""One method's conversion quality, in one run: the model its recipe fine-tunes, next to the original, the
training-free `swa` baseline and the controls trained like it, on held-out text and zero-shot tasks.

    python benchmarks/conversion_quality.py --recipe recipes/smollm2-135m-liger.yaml --text held_out.txt \\
        --arc arc_easy_test.jsonl --hellaswag hellaswag_val.jsonl [--controls swa,swa-trained,lora] \\
        [--lm-eval-limit N] [--json out.json] [key=value ...]

Models (each recipe run trains in its own folder unless the same recipe's finished model is there, and refuses a
model another recipe trained there; wall times are reported):
- `original`: the source model.
- the recipe's method (its label; `swa-recipe` for a swa recipe), after the recipe.
- `swa`: 64-token window with 4 sinks, training-free, with the softmax layers the recipe's model kept.
- `swa-trained`: that baseline run through the recipe's stages (LoRA), the bar Liger must clear.
- `lora`: the fair control, the original fine-tuned with the recipe's LoRA stages on the same data and steps (a
  Parallax conversion whose probe stays zero is the original exactly; attention-transfer stages are left out).

Metrics: perplexity over `--windows` windows of `--context` tokens of `--text` (training must never have seen it:
WikiText-2 validation, say; a file or dataset split that the recipe's data names is refused), perplexity by position
over `--long-windows` windows of `--long-context` tokens in stretches of `--block`, passkey retrieval at
`--passkey-contexts` (`--trials` keys at each of 5 depths, greedy and ranked against 9 distractors), and ARC-Easy /
HellaSwag accuracy through lm-evaluation-harness with the task YAMLs of recipes/lm-eval, reading `--arc`
(allenai/ai2_arc schema) and `--hellaswag` (HellaSwag's own schema). `key=value` overrides apply to the recipe (and
so to its controls).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import linearize  # noqa: F401  (registers the converted model class)
from linearize import sources
from linearize.convert import convert_model
from linearize.data import data_files
from linearize.evaluation import (
    check_lm_eval_tasks,
    eval_rows,
    evaluate_models,
    perplexity_by_position,
    text_source,
    text_windows,
)
from linearize.training.fingerprints import recipe_differences, recipe_hash
from linearize.training.recipe import ConversionSection, Recipe, load_recipe
from linearize.training.trainer import finetune

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"arc_easy_local": "data/arc_easy_test.jsonl", "hellaswag_local": "data/hellaswag_val.jsonl"}  # YAML paths
SWA = {"method": "swa", "window": 64, "sinks": 4}
CONTROLS = ("swa", "swa-trained", "lora")


def control_recipe(recipe: Recipe, kind: str, kept: str | None = None) -> Recipe:
    """The recipe of a control run: `swa-trained` (the baseline through the same stages, LoRA carrying them, with
    the softmax layers `kept`, e.g. "2,7" as the recipe's model kept them, by default the recipe's own value) or
    `lora` (the original through the LoRA stages alone)."""
    spec = recipe.model_dump()
    if kind == "swa-trained":
        spec["conversion"] = {**SWA, "softmax_layers": recipe.conversion.softmax_layers if kept is None else kept}
        stages = spec["stages"]
    else:
        spec["conversion"] = {"method": "parallax"}
        stages = [stage for stage in spec["stages"] if stage["kind"] == "lora"]
        if not stages:
            raise SystemExit(
                "the recipe has no lora stage for the lora control: leave it out (--controls swa,swa-trained)"
            )
    spec["stages"] = [{**stage, "trainable": ["lora"]} for stage in stages]
    spec["output"]["dir"] = f"{recipe.output.dir}-{kind}"
    return Recipe.model_validate(spec)


def trained(recipe: Recipe) -> tuple[torch.nn.Module, float | None]:
    """The recipe's fine-tuned model, running the recipe first unless its run finished; minutes it took here."""
    run = Path(recipe.output.dir)
    minutes = None
    if (run / "model").is_dir():
        check_same_recipe(run / "model", recipe)
    else:
        start = time.perf_counter()
        finetune(recipe, resume=(run / "linearize_recipe.yaml").exists())
        minutes = (time.perf_counter() - start) / 60
    return AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval(), minutes


def check_same_recipe(folder: Path, recipe: Recipe) -> None:
    """Refuse a finished model that another recipe trained: an override such as training.seed=1 leaves output.dir
    as it was, and that model's numbers would be reported under this recipe's name."""
    saved = load_recipe(folder / sources.RECIPE_FILE)
    if recipe_hash(saved) != recipe_hash(recipe):
        raise SystemExit(
            f"{folder} was trained by another recipe ({recipe_differences(saved, recipe)}): give this one its own "
            f"folder with the override output.dir=..., or delete {folder.parent} to train it there"
        )


def task_folder(files: dict[str, Path], into: Path) -> Path:
    """recipes/lm-eval's task YAMLs, copied into `into` with each task reading `files[task]`."""
    into.mkdir(parents=True, exist_ok=True)
    for name, path in TASKS.items():
        if not files[name].is_file():
            raise SystemExit(f"{files[name]} does not exist (the {name} task reads it)")
        text = (ROOT / "recipes" / "lm-eval" / f"{name}.yaml").read_text()
        (into / f"{name}.yaml").write_text(text.replace(path, str(files[name].resolve())))
    (into / "hellaswag_local.py").write_text((ROOT / "recipes" / "lm-eval" / "hellaswag_local.py").read_text())
    return into


def add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out measurements' settings, shared with benchmarks/layer_selection.py."""
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--long-context", type=int, default=2048, help="window length of perplexity by position")
    parser.add_argument("--long-windows", type=int, default=4)
    parser.add_argument("--block", type=int, default=512, help="positions per stretch of perplexity by position")
    parser.add_argument("--passkey-contexts", default="1024,2048")
    parser.add_argument("--trials", type=int, default=4, help="keys per depth (5 depths: 4 gives 20 trials)")


def trained_on(recipe: Recipe, text: str) -> list[str]:
    """What of the text source `text` (as `--text` names it) the recipe's data trains on: the files that one of its
    sources names too, or the same split of the same dataset."""
    held_out, found = text_source(text), []
    for source in recipe.data.sources:
        if held_out.path is not None and source.path is not None:
            files = {path.resolve() for path in data_files(source.path)}
            found += sorted(str(path) for path in {path.resolve() for path in data_files(held_out.path)} & files)
        elif held_out.dataset is not None and (source.dataset, source.subset) == (held_out.dataset, held_out.subset):
            found += [source.label] if source.split == held_out.split else []
    return found


def held_out_windows(args: argparse.Namespace, recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `--text` for perplexity and for perplexity by position, read before any training: a missing
    or too short text, one the recipe trains on, or a block that does not divide the long context, fails now
    rather than after hours."""
    if args.block < 2 or args.long_context % args.block:
        raise SystemExit(f"--long-context {args.long_context} must be a multiple of --block {args.block} (at least 2)")
    overlap = trained_on(recipe, args.text)
    if overlap:
        raise SystemExit(
            f"--text {args.text} holds the recipe's training data: {', '.join(overlap)}; measure on a text it never "
            "trains on (WikiText-2's validation split, say)"
        )
    return (
        text_windows(args.text, tokenizer, args.context, args.windows),
        text_windows(args.text, tokenizer, args.long_context, args.long_windows),
    )


def measure_by_position(models: dict, windows: torch.Tensor, args: argparse.Namespace) -> dict[str, list[float]]:
    """Perplexity by position of each model over the long windows of `--text`, printed as a table."""
    by_position = {name: perplexity_by_position(model, windows, args.block) for name, model in models.items()}
    starts = range(0, args.long_context, args.block)
    print(f"\nperplexity by position ({windows.shape[0]} windows of {args.long_context} tokens)")
    print("| model | " + " | ".join(f"{s}-{s + args.block}" for s in starts) + " |\n|" + "---|" * (len(starts) + 1))
    for name, values in by_position.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return by_position


def write_json(path: str | Path, results: dict) -> None:
    """Write `results` to `path`, making its folder: a script writes them last, after all its work."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=str))


def models_to_compare(recipe: Recipe, controls: list[str]) -> tuple[dict, dict, object]:
    """The recipe's model (trained first unless finished), the original and the `controls`, in float32; the
    minutes each training took here; the original's tokenizer."""
    label = recipe.conversion.method
    if label in CONTROLS:  # a swa recipe: the training-free `swa` control would take its place
        label += "-recipe"
    models, minutes = {}, {}
    models[label], minutes[label] = trained(recipe)
    kept = ",".join(map(str, models[label].config.linearize["softmax_layers"]))  # named or chosen by auto:K
    original, tokenizer = sources.load(recipe.model.name, dtype="float32", revision=recipe.model.revision)
    models["original"] = original.eval()
    if "swa" in controls:
        source, _ = sources.load(recipe.model.name, dtype="float32", revision=recipe.model.revision)
        baseline = ConversionSection(**SWA, softmax_layers=kept)
        plan = baseline.plan(source.config, recipe.model.name or sources.EMBEDDED_NAME)
        models["swa"] = convert_model(source, plan.config).eval()
    for kind in ("swa-trained", "lora"):
        if kind in controls:
            models[kind], minutes[kind] = trained(control_recipe(recipe, kind, kept))
    return models, minutes, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--text", required=True, help="held-out text file (never in the training data)")
    parser.add_argument("--arc", type=Path, required=True, help="ARC-Easy test items, JSONL")
    parser.add_argument("--hellaswag", type=Path, required=True, help="HellaSwag validation items, JSONL")
    parser.add_argument("--controls", default=",".join(CONTROLS))
    add_measurement_arguments(parser)
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many items per task")
    parser.add_argument("--lm-eval-batch-size", type=int, default=16, help="lm-eval requests per forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as for `linearize finetune`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    controls = [c for c in args.controls.split(",") if c]
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        parser.error(f"unknown control(s): {', '.join(sorted(unknown))}")

    recipe = load_recipe(args.recipe, args.overrides)
    files = {"arc_easy_local": args.arc, "hellaswag_local": args.hellaswag}
    with tempfile.TemporaryDirectory() as folder:
        # every input is checked before the recipe and its controls train (hours), not after
        for kind in set(controls) & {"swa-trained", "lora"}:
            control_recipe(recipe, kind)
        tokenizer = sources.load_tokenizer(recipe.model.name, recipe.model.revision)
        windows, long_windows = held_out_windows(args, recipe, tokenizer)
        tasks = str(task_folder(files, Path(folder)))
        check_lm_eval_tasks(list(TASKS), tasks)
        models, minutes, tokenizer = models_to_compare(recipe, controls)
        quality = evaluate_models(
            models,
            tokenizer,
            args.text,
            args.context,
            args.windows,
            [int(c) for c in args.passkey_contexts.split(",")],
            {"trials": args.trials},
            list(TASKS),
            {"include_path": tasks, "limit": args.lm_eval_limit, "batch_size": args.lm_eval_batch_size},
            text_ids=windows,
        )
    header, rows = eval_rows(quality)
    print(f"\n{args.recipe} ({' '.join(args.overrides)}), held-out text {args.text}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    by_position = measure_by_position(models, long_windows, args)
    for name, value in minutes.items():
        if value is not None:
            print(f"{name} fine-tuning wall time: {value:.1f} min ({args.threads} threads)")
    if args.json:
        results = {"quality": quality, "by_position": by_position, "train_minutes": minutes}
        write_json(args.json, results | {"args": vars(args)})


if __name__ == "__main__":
    main()
