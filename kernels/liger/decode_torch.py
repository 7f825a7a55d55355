"""Liger decode in PyTorch: one gated linear attention step, the window-decode op, then the mix."""

import torch

from ..gla.recurrent import gla_step
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
    state's update and read-out are `gla_step`, without the sequence op's dispatch and loop over time."""
    o_linear, new_state = gla_step(q_lin, k_lin, v, g, state)  # [B, H, V], [B, Hkv, K, V] fp32
    o_window = decode_sliding_window_attention(
        q_rot[:, None], window_k, window_v, window_k.shape[1], key_valid=window_valid, scale=scale, softcap=softcap
    )[:, 0]  # [B, H, D]
    o = torch.lerp(o_linear, o_window.float(), mix)  # mix * window + (1 - mix) * linear, as the prefill
    return o.to(q_rot.dtype), new_state
