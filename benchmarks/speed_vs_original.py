"""Prefill and decode speed, cache and prefill peak memory: the embedded model converted by each method against the
original, all measured in one run (what issue #22's targets are judged on).

    python benchmarks/speed_vs_original.py [--methods liger,still,parallax,swa] [--contexts 512,2048,8192]
        [--threads 1,2] [--decode-tokens 16] [--repeats 3] [--json speed.json]

Every model runs in fp32 on the CPU; conversion values, as speed does not depend on training. For each thread
count and context, `linearize.benchmark.run_bench` (what `linearize bench` runs) prefills the same tokens
`--repeats` times per model, alternating between models, then decodes from each cache in `--repeats` runs of
`--decode-tokens` single tokens, alternating again; the table gives each method's ratio to the original: prefill
throughput (median run; above 1 is faster), decode time per token (median over runs of each run's median step;
below 1 is faster) and prefill peak memory (below 1 is less).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from linearize import sources
from linearize.benchmark import run_bench
from linearize.comparison import counted
from linearize.convert import convert_model, plan_conversion


def embedded_models(methods: list[str]) -> dict:
    """The embedded model in fp32 ("original") and its conversion by each method, sharing its weights."""
    original, _ = sources.load(None, dtype="float32")
    models = {"original": original}
    for method in methods:
        models[method] = convert_model(original, plan_conversion(original.config, sources.EMBEDDED_NAME, method).config)
    return models


def ratio_rows(result: dict, methods: list[str]) -> list[str]:
    """Markdown rows: per method, the three ratios to the original at every context."""
    contexts = [row["context"] for row in result["rows"]]
    lines = [
        "| method | prefill x original (" + " / ".join(map(str, contexts)) + ") | decode time x original | "
        "prefill peak memory x original |",
        "|---|---|---|---|",
    ]
    for method in methods:
        cells = []
        for field in ("prefill_tok_s", "decode_ms", "peak_bytes"):
            ratios = [row[method][field] / row["original"][field] for row in result["rows"]]
            cells.append(" / ".join(f"{r:.2f}" for r in ratios))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="liger,still,parallax,swa")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, one run each")
    parser.add_argument("--decode-tokens", type=int, default=16, help="single-token steps in each decode run")
    parser.add_argument("--repeats", type=int, default=3, help="prefill and decode runs per model and context")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    methods = [m for m in args.methods.split(",") if m]
    models = embedded_models(methods)
    contexts = [int(c) for c in args.contexts.split(",")]
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        result = run_bench(models, contexts, args.decode_tokens, args.repeats)
        results.append(result)
        print(f"\n{counted(threads, 'thread')}, median of {counted(args.repeats, 'prefill')} and of "
              f"{counted(args.repeats, 'decode run')} of {counted(args.decode_tokens, 'step')}")  # fmt: skip
        print("\n".join(ratio_rows(result, methods)), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
