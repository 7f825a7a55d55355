"""Liger decode oracle: one token per sequence, plain fp32 loops over heads, written to be obviously correct."""

import torch


def naive_liger_decode(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    q_rot: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    window_valid: torch.Tensor,
    scale: float | None = None,
    mix: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Liger decode step: gated linear state update and readout, sliding-window softmax, and their mix.

    Args:
        q_lin: feature-mapped queries `[B, H, K]`.
        k_lin: feature-mapped keys `[B, Hkv, K]`; query head h reads key head h // (H // Hkv).
        v: values `[B, Hkv, V]`.
        g: log decay `[B, Hkv, K]`, <= 0.
        state: gated linear state `[B, Hkv, K, V]` before this token.
        q_rot: RoPE'd queries `[B, H, D]`.
        window_k: RoPE'd window keys `[B, W, Hkv, D]`, the new token's last.
        window_v: window values `[B, W, Hkv, D]`.
        window_valid: `[B, W]` bool, False for keys nobody may see (padding).
        scale: window score multiplier, default D ** -0.5.
        mix: weight of the window branch; the linear branch gets 1 - mix.

    Returns:
        o `[B, H, V]` in q_rot.dtype and the new state `[B, Hkv, K, V]` in fp32.
    """
    B, H, D = q_rot.shape
    Hkv = k_lin.shape[1]
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale
    new_state = g.float().exp()[..., None] * state.float() + k_lin.float()[..., None] * v.float()[..., None, :]
    o = torch.zeros(B, H, v.shape[-1], dtype=torch.float32, device=q_rot.device)
    for b in range(B):
        valid = window_valid[b]  # [W]
        for h in range(H):
            kv = h // group
            o_linear = new_state[b, kv].T @ q_lin[b, h].float()
            o_window = torch.zeros_like(o_linear)
            if valid.any():
                keys, values = window_k[b, valid, kv].float(), window_v[b, valid, kv].float()  # [n, D]
                p = (keys @ q_rot[b, h].float() * scale).softmax(0)
                o_window = p @ values
            o[b, h] = mix * o_window + (1 - mix) * o_linear
    return o.to(q_rot.dtype), new_state
