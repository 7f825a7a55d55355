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
    B, Hkv, K, V = k.shape[0], k.shape[2], k.shape[3], v.shape[3]
    S = k.new_zeros(B, Hkv, K, V, dtype=torch.float32) if initial_state is None else initial_state
    o = []
    # unbind, not indexing: the backward of T selects would allocate T full-size gradients
    for q_t, k_t, v_t, g_t in zip((q.float() * scale).unbind(1), k.unbind(1), v.unbind(1), g.unbind(1), strict=True):
        o_t, S = gla_step(q_t, k_t, v_t, g_t, S)
        o.append(o_t)
    o = torch.stack(o, dim=1)  # [B, T, H, V]
    return o.to(q.dtype), S if output_final_state else None


def gla_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of gated linear attention, in fp32: S = diag(exp(g)) S + k v^T, o = S^T q. A decode step calls it
    directly (Liger's), as on a CPU a step costs about as many microseconds as it has operations.

    Args:
        q: queries `[B, H, K]`, already scaled.
        k: keys `[B, Hkv, K]`; the query heads of a group read one state.
        v: values `[B, Hkv, V]`.
        g: log decay `[B, Hkv, K]`, <= 0.
        state: `[B, Hkv, K, V]` before this token.

    Returns:
        o `[B, H, V]` and the state after this token `[B, Hkv, K, V]`, both fp32.
    """
    B, H, K = q.shape
    Hkv = k.shape[1]
    update = k.float()[..., None] * v.float()[..., None, :]  # [B, Hkv, K, V]
    state = torch.addcmul(update, state.float(), g.float().exp()[..., None])
    o = q.float().view(B, Hkv, H // Hkv, K) @ state  # [B, Hkv, G, V]
    return o.view(B, H, -1), state
