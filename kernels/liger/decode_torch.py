"""Liger decode in PyTorch: the gated state update and read-out of one token, the window-decode op, then the mix."""

import torch

from ..window.decode import decode_sliding_window_attention


def torch_liger_decode(
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
    """One Liger decode step; arguments and returns as in `naive_liger_decode`. One token needs no scan: the gated
    state update and its read-out are one product each, without the sequence op's loop over time (on a CPU a decode
    step costs about as many microseconds as it has operations)."""
    B, H, K = q_lin.shape
    Hkv = k_lin.shape[1]
    decay = g.float().exp()[..., None]  # [B, Hkv, K, 1]
    update = k_lin.float()[..., None] * v.float()[..., None, :]  # [B, Hkv, K, V]
    new_state = torch.addcmul(update, state.float(), decay)
    o_linear = (q_lin.float().view(B, Hkv, H // Hkv, K) @ new_state).view(B, H, -1)  # query heads of a group: rows
    o_window = decode_sliding_window_attention(
        q_rot[:, None], window_k, window_v, window_k.shape[1], key_valid=window_valid, scale=scale, softcap=softcap
    )[:, 0]  # [B, H, D]
    o = torch.lerp(o_linear, o_window.float(), mix)  # mix * window + (1 - mix) * linear, as the prefill
    return o.to(q_rot.dtype), new_state
