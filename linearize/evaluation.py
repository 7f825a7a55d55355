"""Quality measurements shared by the CLI, the demo and the benchmarks."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, context: int = 512, max_windows: int = 8) -> float:
    """Perplexity over up to `max_windows` consecutive, non-overlapping windows of `context` tokens of `text`.

    Each window is scored independently from an empty state (the first token of a window is not predicted).
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = min(max_windows, len(ids) // context)
    if windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {context}")
    batch = ids[: windows * context].view(windows, context).to(model.device)
    total, count = 0.0, 0
    for row in batch:
        out = model(input_ids=row[None], labels=row[None], use_cache=False)
        total += out.loss.item() * (context - 1)
        count += context - 1
    return math.exp(total / count)


def compare(
    models: dict, tokenizer, prompt: str, context: int = 512, windows: int = 4, max_new_tokens: int = 32
) -> list[dict]:
    """Perplexity on the built-in text and a greedy sample for each named model, side by side."""
    from .data import builtin_text
    from .generation import generate

    text = builtin_text()
    return [
        {
            "model": name,
            "perplexity": perplexity(model, tokenizer, text, context, windows),
            "sample": generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens),
        }
        for name, model in models.items()
    ]
