"""Liger decode in PyTorch: the existing one-token GLA and window-decode ops, then the mix."""

import torch

from ..gla.recurrent import fused_recurrent_gla
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
    """One Liger decode step; arguments and returns as in `naive_liger_decode`."""
    o_linear, new_state = fused_recurrent_gla(
        q_lin[:, None], k_lin[:, None], v[:, None], g[:, None], scale=1.0, initial_state=state, output_final_state=True
    )  # [B, 1, H, V] in q_lin.dtype, [B, Hkv, K, V] fp32
    o_window = decode_sliding_window_attention(
        q_rot[:, None], window_k, window_v, window_k.shape[1], key_valid=window_valid, scale=scale, softcap=softcap
    )  # [B, 1, H, D]
    o = torch.lerp(o_linear.float(), o_window.float(), mix)  # mix * window + (1 - mix) * linear, as the prefill
    return o[:, 0].to(q_rot.dtype), new_state
