"""Liger oracles in plain fp32: one decode step (loops over heads), and a sequence (the GLA and window oracles
composed), written to be obviously correct; plus the input check of `liger_attention`."""

import torch

# the most window keys the fused Triton decode step holds: its tiles span the whole window (keys `[W, BLOCK_D]`,
# values `[W, BLOCK_V]`, probabilities `[G, W]`); `liger_decode` runs longer windows on the torch path
MAX_WINDOW = 128


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
    softcap: float | None = None,
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
        window_k: RoPE'd window keys `[B, W, Hkv, D]`, the new token's among them, in any order.
        window_v: window values `[B, W, Hkv, D]`.
        window_valid: `[B, W]` bool, False for keys nobody may see (padding).
        scale: window score multiplier, default D ** -0.5.
        softcap: if set, every window score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2).
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
                z = keys @ q_rot[b, h].float() * scale
                if softcap is not None:
                    z = softcap * torch.tanh(z / softcap)
                p = z.softmax(0)
                o_window = p @ values
            o[b, h] = mix * o_window + (1 - mix) * o_linear
    return o.to(q_rot.dtype), new_state


def check_attention_inputs(q_lin, k_lin, v, g, q_rot, k_rot, window, key_valid, past_k, past_v, initial_state):
    """Raise a ValueError naming the problem when the arguments do not fit `liger_attention`'s shapes."""
    B, T, H, K = q_lin.shape
    Hkv, V = v.shape[2], v.shape[3]
    P = 0 if past_k is None else past_k.shape[1]
    ok = (
        Hkv >= 1
        and H % Hkv == 0
        and k_lin.shape == g.shape == (B, T, Hkv, K)
        and v.shape[:2] == (B, T)
        and q_rot.shape == (B, T, H, V)
        and k_rot.shape == (B, T, Hkv, V)
        and (past_k is None) == (past_v is None)
        and (past_k is None or past_k.shape == past_v.shape == (B, P, Hkv, V))
        and (initial_state is None or initial_state.shape == (B, Hkv, K, V))
    )
    if not ok:
        shapes = {"q_lin": q_lin, "k_lin": k_lin, "v": v, "g": g, "q_rot": q_rot, "k_rot": k_rot}
        shapes |= {"past_k": past_k, "past_v": past_v, "initial_state": initial_state}
        got = ", ".join(f"{name} {None if x is None else tuple(x.shape)}" for name, x in shapes.items())
        raise ValueError(
            "expected q_lin [B, T, H, K], k_lin and g [B, T, Hkv, K], v [B, T, Hkv, D], q_rot [B, T, H, D], k_rot "
            "[B, T, Hkv, D], past_k and past_v [B, P, Hkv, D] (both or neither), initial_state [B, Hkv, K, V] with "
            f"H % Hkv == 0; got {got}"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if key_valid is not None and (key_valid.shape != (B, P + T) or key_valid.dtype != torch.bool):
        raise ValueError(f"expected key_valid [B, P + T] = {(B, P + T)} bool, got {tuple(key_valid.shape)}")


def window_keys(k_rot, v, past_k, past_v, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The window branch's keys and values `[B, P + T, Hkv, D]` in `dtype`: the history, then the new tokens."""
    if past_k is None:
        return k_rot.to(dtype), v.to(dtype)
    return torch.cat([past_k.to(dtype), k_rot.to(dtype)], dim=1), torch.cat([past_v.to(dtype), v.to(dtype)], dim=1)


def naive_liger_attention(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    window: int = 64,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    mix: float = 0.5,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention over a sequence: the two branch oracles in fp32, then the mix (arguments as in
    `liger_attention`). Returns o `[B, T, H, D]` in q_rot.dtype and the final state (fp32) or None."""
    from ..gla.reference import naive_recurrent_gla
    from ..window.reference import naive_sliding_window_attention

    o_linear, state = naive_recurrent_gla(
        q_lin.float(), k_lin, v, g, initial_state=initial_state, output_final_state=output_final_state
    )
    keys, values = window_keys(k_rot, v, past_k, past_v, torch.float32)
    o_window = naive_sliding_window_attention(
        q_rot.float(), keys, values, window, key_valid, scale=scale, softcap=softcap
    )
    return (mix * o_window + (1 - mix) * o_linear).to(q_rot.dtype), state
