"""Sliding-window attention for a single query per sequence (decoding), in plain PyTorch.

With one query the window is just the last `window` keys, so there is nothing to block: the keys it sees go
to one fused `scaled_dot_product_attention` call. It exists because decoding calls this once per layer per
token, where the blockwise path's padding and unfolding cost more than the attention itself.
"""

import torch

from ..common.masks import all_valid_known
from .chunk import attention


def decode_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of one query per sequence over the last `window` keys plus optional sink keys.

    Args:
        q: queries `[B, 1, H, D]`, the token at the last of the S key positions.
        k: keys `[B, S, Hkv, D]`, shared by H // Hkv query heads.
        v: values `[B, S, Hkv, D]`.
        window: keys visible to the query, counting its own token.
        key_valid: `[B, S]` bool, False for keys nobody may see (padding); None means all valid.
        sink_k: extra keys `[B, E, Hkv, D]` outside the window, or None.
        sink_v: extra values `[B, E, Hkv, D]`, or None.
        sink_mask: `[B, 1, E]` bool, which extra keys the query sees; None means all of them.
        scale: score multiplier, default D ** -0.5.
        softcap: if set, every score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2).

    Returns:
        o `[B, 1, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    visible = key_valid  # [B, S]
    if window < k.shape[1]:  # a cache passes exactly the window's keys: no views to make, each an op
        k, v = k[:, -window:], v[:, -window:]  # [B, W, Hkv, D]
        visible = None if key_valid is None else key_valid[:, -window:]  # [B, W]
    # a slot not yet written may hold anything, NaN included; a window known to be all valid skips the fill
    if visible is not None and not all_valid_known(visible):
        k, v = (x.masked_fill(~visible[..., None, None], 0.0) for x in (k, v))
    if sink_k is not None:
        if visible is None:
            visible = torch.ones_like(k[..., 0, 0], dtype=torch.bool)
        sink_visible = torch.ones_like(sink_k[..., 0, 0], dtype=torch.bool) if sink_mask is None else sink_mask[:, 0]
        k, v, visible = torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1), torch.cat([sink_visible, visible], 1)
    # SDPA (without a softcap): one fused op, GQA without repeating K/V; zeros for a query that sees no key
    o = attention(
        q.transpose(1, 2),  # [B, H, 1, D]
        k.transpose(1, 2),  # [B, Hkv, W, D]
        v.transpose(1, 2),
        None if visible is None else visible[:, None, None, :],
        scale,
        softcap,
    )
    return o.transpose(1, 2)
