"""Prefill and decode speed and cache size: the embedded model converted with Liger vs the original, one run.

    python benchmarks/liger_vs_original.py [--contexts 512,2048,8192] [--decode-tokens 32] [--repeats 3]

Both models run in fp32 on the CPU with the same thread count. For each context length C it times the prefill
of C tokens (tokens/s, best of `--repeats` runs alternating between the models), then `--decode-tokens`
single-token steps from that cache, one model after the other, and reports the cache bytes after prefill. Decode
speed is each model's fastest step (ms/token; the JSON also holds the median): on a shared 2-core machine the
slower steps measure other work, which swings medians by 20-30% between runs.
Ratios compare the converted model with the original measured in the same run. The measurement itself is
`linearize.benchmark.measure`, which `linearize bench` also uses (and which adds peak memory).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from linearize import sources
from linearize.benchmark import measure
from linearize.convert import convert_model, plan_conversion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="prefill runs per model and context (best counts)")
    parser.add_argument("--method", default="liger")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    original, _, _ = sources.load(None, dtype="float32")
    plan = plan_conversion(original.config, sources.EMBEDDED_NAME, args.method)
    converted = convert_model(original, plan.config)
    contexts = [int(c) for c in args.contexts.split(",")]
    models = {"original": original, args.method: converted}
    measure(models, 64, 2, repeats=1)  # warm-up

    rows = []
    for context in contexts:
        rows.append({"context": context, **measure(models, context, args.decode_tokens, args.repeats)})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.method} vs original, fp32, {args.threads} threads, fastest of {args.decode_tokens} decode steps")
    header = (
        f"{'context':>7} | {'prefill tok/s orig':>18} {args.method:>8} {'ratio':>6} | "
        f"{'decode ms/tok orig':>18} {args.method:>8} {'speedup':>7} | {'cache MiB orig':>14} {args.method:>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base, ours = row["original"], row[args.method]
        print(
            f"{row['context']:>7} | {base['prefill_tok_s']:>18.0f} {ours['prefill_tok_s']:>8.0f} "
            f"{ours['prefill_tok_s'] / base['prefill_tok_s']:>5.2f}x | {base['decode_ms']:>18.1f} "
            f"{ours['decode_ms']:>8.1f} {base['decode_ms'] / ours['decode_ms']:>6.2f}x | "
            f"{base['cache_bytes'] / 2**20:>14.1f} {ours['cache_bytes'] / 2**20:>8.2f}"
        )
    first, last = rows[0][args.method], rows[-1][args.method]
    print(
        f"{args.method} decode at {rows[-1]['context']} / at {rows[0]['context']}: "
        f"{last['decode_ms'] / first['decode_ms']:.2f}x"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
