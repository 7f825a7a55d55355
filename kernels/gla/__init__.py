"""Gated linear attention (GLA): reference, chunked and recurrent PyTorch paths, Triton kernels, and the dispatcher."""

import torch

from ..backend import outside_autocast, resolve_backend
from .chunk import chunk_gla
from .factored import factorable, factored_chunk_gla
from .fla import fla_chunk_gla
from .recurrent import fused_recurrent_gla
from .reference import check_inputs, naive_recurrent_gla

__all__ = [
    "GLA_BACKENDS",
    "chunk_gla",
    "factored_chunk_gla",
    "fla_chunk_gla",
    "fused_recurrent_gla",
    "gated_linear_attention",
    "naive_recurrent_gla",
]

GLA_BACKENDS = ("reference", "torch", "triton", "fla")  # the implementations `gated_linear_attention` runs on

# up to this many tokens (decoding) the token loop is cheaper than the fixed cost of the chunked path
RECURRENT_MAX_T = 4


@outside_autocast
def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`; H must be a multiple of Hkv, query head h reads key head h // (H // Hkv).
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0 (e.g. logsigmoid(x) / 16).
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` fp32 state before the first token, or None for zeros. The state
            depends only on k, v and g, so the query heads of a group share it.
        output_final_state: whether to return the state after the last token.
        cu_seqlens: optional int32/int64 `[N + 1]` cumulative boundaries of N sequences packed back to back along T
            (FlashAttention style: cu_seqlens[0] = 0, cu_seqlens[-1] = T), with B = 1. The state restarts at every
            boundary, from initial_state[n] if given; initial_state and the final state are then `[N, Hkv, K, V]`.
        backend: "reference", "torch", "triton", "fla" (flash-linear-attention, if installed) or None (see
            `resolve_backend`; CUDA tensors default to "triton"). "torch" runs the token loop for a few tokens,
            `factored_chunk_gla` where nothing needs a gradient and the decay allows it, else `chunk_gla`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` (`[N, Hkv, K, V]` with cu_seqlens) in fp32
        or None.
    """
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    T = q.shape[1]
    name = resolve_backend(backend, q.device, available=GLA_BACKENDS)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    if name == "reference":
        return naive_recurrent_gla(q, k, v, g, **kwargs)
    if name == "fla":
        return fla_chunk_gla(q, k, v, g, **kwargs)
    if name == "triton":
        from .triton import triton_chunk_gla  # imports triton only when it is used

        return triton_chunk_gla(q, k, v, g, **kwargs)
    # the token loop pays off for short sequences; packed, that is when every sequence is short
    if (T if cu_seqlens is None else int(cu_seqlens.diff().max())) <= RECURRENT_MAX_T:
        return fused_recurrent_gla(q, k, v, g, **kwargs)
    inputs = (q, k, v, g, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if cu_seqlens is None and not needs_grad and factorable(g):
        return factored_chunk_gla(q, k, v, g, **kwargs)
    return chunk_gla(q, k, v, g, **kwargs)
