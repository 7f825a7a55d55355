"""Token-by-token GLA oracle: slow, fp32, written to be obviously correct."""

import torch


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention as the plain recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros. The state depends only
            on k, v and g, so the query heads of a group share it.
        output_final_state: whether to return the state after the last token.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    Hkv = k.shape[2]
    k, v, g = (x.float() for x in (k, v, g))
    S = k.new_zeros(B, Hkv, K, V) if initial_state is None else initial_state.float()
    o = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        # query head h reads the state of its key head h // (H // Hkv)
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S.repeat_interleave(H // Hkv, dim=1)))
    return torch.stack(o, dim=1).to(q.dtype), (S if output_final_state else None)
