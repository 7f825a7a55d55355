"""How much of a fine-tuned Parallax probe's effect is a query shift.

    python benchmarks/parallax_probe_order.py MODEL_FOLDER --text held_out.txt [--windows 2] [--context 512]

To first order in s = r . k, Parallax attention is softmax attention with its logits moved by -s, i.e. with the
query q - r / scale (docs/methods.md §4.2), which a LoRA update of q_proj can also make. Per layer, over windows
of the text, in float64: how much the probe changes the attention output (|o - o_softmax| / |o_softmax|), how
much of that change the query shift leaves unexplained (|o - o_shift| / |o - o_softmax|, the second-order share),
and the spread of s under the softmax weights, sqrt(sum_j p_ij (s_ij - t_i)^2), that sets the second-order terms.
A probe whose second-order share is small adds nothing that the fair control's q_proj LoRA could not.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from linearize.kernels.parallax import naive_parallax_attention

import linearize  # noqa: F401  (registers the converted model class)
import linearize.layers.parallax as parallax_layer
from linearize import sources
from linearize.evaluation import text_windows


def captured_inputs(model, ids: torch.Tensor) -> list[dict]:
    """What every Parallax layer hands its op in one forward over `ids`: its RoPE'd q, r, k, v in float64, with the
    layer's scale and window."""
    inputs = []
    attend = parallax_layer.parallax_attention

    def spy(q, r, k, v, **options):
        if options.get("softcap") is not None:
            raise ValueError("capped logits (Gemma 2) move by more than s: the query shift is not the first order")
        tensors = dict(zip("qrkv", (x.detach().double() for x in (q, r, k, v)), strict=True))
        inputs.append(tensors | {"scale": options.get("scale"), "window": options.get("window")})
        return attend(q, r, k, v, **options)

    with mock.patch.object(parallax_layer, "parallax_attention", spy), torch.no_grad():
        model(ids)
    return inputs


def probe_order(q, r, k, v, scale: float | None = None, window: int | None = None) -> dict[str, float]:
    """The probe's effect on one layer's output, its second-order share and the weighted spread of s. Softmax
    attention is Parallax with a zero probe (docs/methods.md §4.2), so the reference computes all three outputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    zero = torch.zeros_like(r)
    o = naive_parallax_attention(q, r, k, v, scale=scale, window=window)
    o_softmax = naive_parallax_attention(q, zero, k, v, scale=scale, window=window)
    o_shift = naive_parallax_attention(q - r / scale, zero, k, v, scale=scale, window=window)
    change = (o - o_softmax).norm()
    keys = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    lag = torch.arange(q.shape[1])[:, None] - torch.arange(q.shape[1])[None]
    visible = (lag >= 0) & (lag < (q.shape[1] if window is None else window))
    p = (torch.einsum("bthd,bshd->bhts", q, keys) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    s = torch.einsum("bthd,bshd->bhts", r, keys)  # [B, H, T, T]
    t_bar = (p * s).sum(-1, keepdim=True)
    return {
        "effect": (change / o_softmax.norm()).item(),
        "second_order": ((o - o_shift).norm() / change).item() if change > 0 else 0.0,
        "spread": (p * (s - t_bar) ** 2).sum(-1).sqrt().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted Parallax model folder (after fine-tuning)")
    parser.add_argument("--text", required=True, help="held-out text, as `linearize eval --text` reads it")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()

    model, tokenizer = sources.load(args.model, dtype="float32")
    ids = text_windows(args.text, tokenizer, args.context, args.windows)
    layers = captured_inputs(model, ids)
    if not layers:
        parser.error(f"{args.model} has no Parallax layer")
    rows = [probe_order(**inputs) for inputs in layers]
    print("| layer | output change | second-order share | spread of s |")
    print("|---|---|---|---|")
    for index, row in enumerate(rows):
        print(f"| {index} | {row['effect']:.4f} | {row['second_order']:.3f} | {row['spread']:.4f} |")
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    print(f"| mean | {mean['effect']:.4f} | {mean['second_order']:.3f} | {mean['spread']:.4f} |")


if __name__ == "__main__":
    main()
