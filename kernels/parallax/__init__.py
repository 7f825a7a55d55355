"""Parallax attention (docs/methods.md §4): softmax attention plus a learned covariance correction. Two ops, each
with a "reference" path (plain oracles, full masks), a "torch" path (blockwise PyTorch, no [T, T] matrix; the CPU
default; without autograd it runs `rowwise_parallax_attention`, the same sums in fewer, larger products) and a
"triton" path (fused kernels, the sequence op with its own backward; CUDA tensors default to it):
`parallax_attention` over a sequence (prefill and training, differentiable) and `parallax_decode`, one new token
per sequence. The Triton modules are imported only when the "triton" backend runs, so CPU-only installs never
import triton.

Semantics, per head. Layouts are `[B, T, H, D]`; q and r have H heads, k and v Hkv heads with H a multiple of Hkv,
and query head h reads kv head h // (H // Hkv) (K/V are never repeated). With P cached history keys before the T
new ones, query t sits at key position i = P + t and sees key j iff j <= i, i - window < j (when a window is given)
and key_valid[b, j]; key_valid `[B, P + T]` is False at padding, wherever it is, and an invalid key is seen by
nobody. Over the visible keys j:
    z_ij = scale q_i . k_j (scale = D ** -0.5 by default),   s_ij = r_i . k_j (unscaled),
    p_ij = softmax_j(z_ij),   t_bar_i = sum_j p_ij s_ij,   o_i = sum_j p_ij (1 + t_bar_i - s_ij) v_j,
that is o_i = v_bar_i - C_i r_i with C_i the p-weighted covariance of v and k; r = 0 gives softmax attention
exactly. With a softcap (Gemma 2), z_ij becomes softcap tanh(z_ij / softcap) on the reference and torch paths;
s_ij is never capped. A query that sees no key outputs zeros (so the output at a padded query is finite, otherwise
unspecified).
Accumulation is fp32 (float64 for float64 inputs); outputs come in q.dtype.
"""

import torch

from ..backend import outside_autocast, resolve_backend, softcap_unsupported
from .chunk import chunk_parallax_attention, rowwise_parallax_attention, torch_parallax_decode
from .reference import check_inputs, naive_parallax_attention, naive_parallax_decode

__all__ = [
    "chunk_parallax_attention",
    "naive_parallax_attention",
    "naive_parallax_decode",
    "parallax_attention",
    "parallax_decode",
    "rowwise_parallax_attention",
    "torch_parallax_decode",
]


@outside_autocast
def parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Parallax attention over a sequence, optionally continuing P cached tokens (module docstring).

    Args:
        q: queries `[B, T, H, D]`.
        r: probes `[B, T, H, D]`.
        k: keys `[B, T, Hkv, D]`; H must be a multiple of Hkv.
        v: values `[B, T, Hkv, D]`.
        scale: multiplier of q . k (r . k is unscaled), default D ** -0.5.
        softcap: if set, the softmax logits z = scale q . k become softcap * tanh(z / softcap) (Gemma 2); r . k
            is not capped. Not on the Triton path, so CUDA tensors then default to "torch".
        window: keys visible per query, counting its own token (>= 1); None means all earlier keys.
        key_valid: `[B, P + T]` bool, False for keys nobody may see (padding); None means all valid.
        past_k: keys of the P cached tokens before these `[B, P, Hkv, D]`, or None.
        past_v: their values `[B, P, Hkv, D]`, given together with past_k.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`; CUDA tensors default to "triton").

    Returns:
        o `[B, T, H, D]` in q.dtype. Differentiable w.r.t. q, r, k, v, past_k and past_v.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    name = resolve_backend(
        backend, q.device, available=("reference", "torch", "triton"), unsupported=softcap_unsupported(softcap)
    )
    options = {} if softcap is None else {"softcap": softcap}  # only the reference and torch paths take a cap
    if name == "reference":
        attend = naive_parallax_attention
    elif name == "torch":
        tensors = (q, r, k, v, past_k, past_v)
        needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
        attend = chunk_parallax_attention if needs_grad else rowwise_parallax_attention
    else:
        from .triton import triton_parallax_attention as attend
    return attend(q, r, k, v, scale=scale, window=window, key_valid=key_valid, past_k=past_k, past_v=past_v, **options)


@outside_autocast
def parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor | None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One Parallax decode step: the new token's query over its cache (the last row of `parallax_attention`).

    Args:
        q: queries `[B, H, D]` of the new token.
        r: probes `[B, H, D]`.
        k_cache: keys `[B, L, Hkv, D]`, already holding the new token's key at the end; H must be a multiple of Hkv.
            Any strides with a contiguous last dimension are read in place (a head-major cache's view too).
        v_cache: values `[B, L, Hkv, D]`, likewise.
        cache_valid: `[B, L]` bool, False for slots nobody may see (padding, unfilled); None means all valid.
        scale: multiplier of q . k, default D ** -0.5.
        softcap: if set, the softmax logits z = scale q . k become softcap * tanh(z / softcap) (Gemma 2); not on
            the Triton path, so CUDA tensors then default to "torch".
        window: the last `window` slots are visible (>= 1); None means all.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`).

    Returns:
        o `[B, H, D]` in q.dtype; zeros for a query that sees no key. Not differentiable on the Triton path.
    """
    name = resolve_backend(  # each implementation checks its inputs: at decode a second check would be a cost
        backend, q.device, available=("reference", "torch", "triton"), unsupported=softcap_unsupported(softcap)
    )
    if name == "triton":
        from .decode_triton import triton_parallax_decode

        return triton_parallax_decode(q, r, k_cache, v_cache, cache_valid, scale=scale, window=window)
    step = naive_parallax_decode if name == "reference" else torch_parallax_decode
    return step(q, r, k_cache, v_cache, cache_valid, scale=scale, softcap=softcap, window=window)
