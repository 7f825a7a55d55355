"""Where a prefill and a decode step spend their time: attention, projections, MLP and the rest, per method.

    python benchmarks/inference_profile.py [--methods liger,still,parallax,swa] [--contexts 512,2048,8192]
        [--decode-tokens 16] [--repeats 3] [--threads 1] [--json profile.json]

The embedded SmolLM2-135M (fp32, CPU) and its conversion by each method (conversion values: speed does not
depend on training) prefill the same random tokens, then decode single tokens from that cache. Module hooks
time every part of every layer:

- attention: the attention module minus its projections (RoPE, the method's op, cache reads and writes);
- projections: every `nn.Linear` inside attention (q/k/v/o, and the probe or gate projections a method adds);
- MLP: the decoder layers' MLPs;
- head: embeddings, RMSNorms and the LM head (with `logits_to_keep=1`, one row);
- rest: the call's wall time minus all of the above (the decoder loop, masks, rotary tables, cache objects,
  Python): framework overhead.

Each cell is the median over repeats (prefill) or steps (decode) of that part's milliseconds. The hooks cost a
few microseconds each, which the `rest` column and the totals include; the totals are for reading the shares,
and `linearize bench` is what measures speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from speed_vs_original import embedded_models  # beside this file
from torch import nn

from linearize.benchmark import timed_forward

PARTS = ("attention", "projections", "mlp", "head", "rest")


class PartTimer:
    """Adds each hooked module's wall time to its part; `attention` gets its module's time minus its projections'."""

    def __init__(self, model: nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}
        self._handles = []
        decoder = model.model
        for layer in decoder.layers:
            self._hook(layer.self_attn, "attention")
            for module in layer.self_attn.modules():
                if isinstance(module, nn.Linear):
                    self._hook(module, "projections", subtract_from="attention")
            self._hook(layer.mlp, "mlp")
            self._hook(layer.input_layernorm, "head")
            self._hook(layer.post_attention_layernorm, "head")
        for module in (decoder.embed_tokens, decoder.norm, model.lm_head):
            self._hook(module, "head")

    def _hook(self, module: nn.Module, part: str, subtract_from: str | None = None) -> None:
        def before(module, args):
            self._started[id(module)] = time.perf_counter()

        def after(module, args, output):
            elapsed = time.perf_counter() - self._started.pop(id(module))
            self.seconds[part] += elapsed
            if subtract_from:
                self.seconds[subtract_from] -= elapsed

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def take(self, total: float) -> dict[str, float]:
        """The milliseconds of each part since the last call, `rest` being what no part accounts for."""
        parts = {part: 1000 * self.seconds.get(part, 0.0) for part in PARTS[:-1]}
        parts["rest"] = 1000 * total - sum(parts.values())
        self.seconds.clear()
        return parts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {part: statistics.median(sample[part] for sample in samples) for part in PARTS}


@torch.inference_mode()
def profile(model, context: int, decode_tokens: int, repeats: int, seed: int = 0) -> dict:
    """{"prefill": {part: ms}, "decode": {part: ms per step}} for one model at one context."""
    ids = torch.randint(100, model.config.vocab_size, (1, context + decode_tokens),
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    timer = PartTimer(model)
    try:
        timed_forward(model, ids[:, :64], logits_to_keep=1)  # lazy initialisation
        timer.take(0.0)
        prefill, decode = [], []
        for _ in range(repeats):
            cache = None  # free the previous run's cache first
            seconds, cache = timed_forward(model, ids[:, :context], logits_to_keep=1)
            prefill.append(timer.take(seconds))
        for t in range(context, context + decode_tokens):
            seconds, cache = timed_forward(model, ids[:, t : t + 1], cache)
            decode.append(timer.take(seconds))
    finally:
        timer.remove()
    return {"prefill": _medians(prefill), "decode": _medians(decode)}


def table(results: dict, phase: str) -> list[str]:
    """Markdown rows: a row per (context, model), milliseconds and share of each part."""
    lines = [
        f"| context | model | total ms | {' | '.join(PARTS)} |",
        "|---|---|---|" + "---|" * len(PARTS),
    ]
    for context, by_model in results.items():
        for name, phases in by_model.items():
            parts = phases[phase]
            total = sum(parts.values())
            cells = [f"{parts[p]:.1f} ({100 * parts[p] / total:.0f}%)" for p in PARTS]
            lines.append(f"| {context} | {name} | {total:.1f} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="liger,still,parallax,swa")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="prefills per model and context (median counts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = embedded_models([m for m in args.methods.split(",") if m])
    results = {}
    for context in (int(c) for c in args.contexts.split(",")):
        results[context] = {name: profile(model, context, args.decode_tokens, args.repeats)
                            for name, model in models.items()}  # fmt: skip
        print(f"context {context} done", flush=True)
    threads = f"{args.threads} thread" + "s" * (args.threads != 1)
    for phase, unit in (("prefill", "ms per prefill"), ("decode", "ms per decode step")):
        samples = args.repeats if phase == "prefill" else args.decode_tokens
        print(f"\n{phase}: {unit}, fp32, {threads}, median of {samples}")
        print("\n".join(table(results, phase)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # written last, after the profile's minutes
        Path(args.json).write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
