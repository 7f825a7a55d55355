"""Sliding-window softmax attention with optional sink keys: reference, blockwise and decode paths in PyTorch,
Triton kernels, and the dispatcher."""

import torch

from ..backend import outside_autocast, resolve_backend, softcap_unsupported
from .chunk import chunk_sliding_window_attention
from .decode import decode_sliding_window_attention
from .reference import check_inputs, naive_sliding_window_attention

__all__ = [
    "chunk_sliding_window_attention",
    "decode_sliding_window_attention",
    "naive_sliding_window_attention",
    "sliding_window_attention",
]


@outside_autocast
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the last `window` keys up to itself, plus optional sink keys.

    Query t sits at key position i = S - T + t and sees key j iff i - window < j <= i and key_valid[b, j],
    plus the sink keys e with sink_mask[b, t, e]. The caller guarantees no key is both a window and a sink key.

    Args:
        q: queries `[B, T, H, D]`; they are the last T of the S key positions.
        k: keys `[B, S, Hkv, D]` with S >= T (the first S - T are cached history); H must be a multiple of Hkv.
        v: values `[B, S, Hkv, D]`.
        window: keys visible per query, counting its own token (>= 1).
        key_valid: `[B, S]` bool, False for keys nobody may see (padding); None means all valid.
        sink_k: extra keys `[B, E, Hkv, D]` outside the window, or None.
        sink_v: extra values `[B, E, Hkv, D]`, given together with sink_k.
        sink_mask: `[B, T, E]` bool, which extra keys each query sees; None means all of them.
        scale: score multiplier, default D ** -0.5.
        softcap: if set, every score s becomes softcap * tanh(s / softcap) before masking and softmax (Gemma 2's
            attention logit soft-capping); not on the Triton path, so CUDA tensors then default to "torch".
        backend: "reference", "torch", "triton" or None (see `resolve_backend`).

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    check_inputs(q, k, v, window, key_valid, sink_k, sink_v, sink_mask)
    T = q.shape[1]
    name = resolve_backend(
        backend, q.device, available=("reference", "torch", "triton"), unsupported=softcap_unsupported(softcap)
    )
    if name == "triton":
        from .triton import triton_sliding_window_attention  # imports triton only when it is used

        return triton_sliding_window_attention(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale)
    if name == "reference":
        attend = naive_sliding_window_attention
    else:
        attend = decode_sliding_window_attention if T == 1 else chunk_sliding_window_attention
    return attend(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale, softcap)
