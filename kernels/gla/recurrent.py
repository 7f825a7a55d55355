"""Token-by-token GLA for decoding, where T is usually 1 and chunking would only add padding."""

import torch

from .reference import check_cu_seqlens, varlen_loop


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, one token at a time, vectorised over batch and heads.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros. The state depends only
            on k, v and g, so the query heads of a group share it.
        output_final_state: whether to return the state after the last token.
        cu_seqlens: optional `[N + 1]` boundaries of N sequences packed along T (B must be 1); the state restarts
            at each one, initial_state and the final state are then `[N, Hkv, K, V]`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None.
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        return varlen_loop(fused_recurrent_gla, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    dtype = q.dtype
    q = q.float().reshape(B, T, Hkv, H // Hkv, K) * scale  # the query heads of a group read one state
    k = k.float()[..., None]  # [B, T, Hkv, K, 1]
    v = v.float()[:, :, :, None, :]  # [B, T, Hkv, 1, V]
    decay = g.float()[..., None].exp()  # [B, T, Hkv, K, 1]
    S = k.new_zeros(B, Hkv, K, V) if initial_state is None else initial_state.float()
    o = []
    # unbind, not indexing: the backward of T selects would allocate T full-size gradients
    for q_t, k_t, v_t, decay_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decay.unbind(1), strict=True):
        S = torch.addcmul(k_t * v_t, S, decay_t)
        o.append(q_t @ S)  # [B, Hkv, G, V]
    o = torch.stack(o, dim=1).reshape(B, T, H, V)
    return o.to(dtype), S if output_final_state else None
