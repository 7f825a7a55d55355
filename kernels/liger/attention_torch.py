"""Liger attention over a sequence in PyTorch: the GLA and sliding-window ops' torch paths, then the mix."""

import torch

from ..gla import gated_linear_attention
from ..window import sliding_window_attention
from .reference import window_keys


def torch_liger_attention(
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
    """Liger attention; arguments and returns as in `naive_liger_attention`."""
    # fp32 queries give the linear branch back in fp32 (the op computes in fp32 anyway), mixed unrounded as the
    # decode step mixes it: without a normaliser that branch can pass float16's range where the mix does not
    o_linear, state = gated_linear_attention(
        q_lin.float(), k_lin, v, g, initial_state=initial_state, output_final_state=output_final_state, backend="torch"
    )
    # the window branch multiplies in q_rot's dtype (SDPA wants one dtype)
    keys, values = window_keys(k_rot, v, past_k, past_v, q_rot.dtype)
    o_window = sliding_window_attention(
        q_rot, keys, values, window=window, key_valid=key_valid, scale=scale, softcap=softcap, backend="torch"
    )
    # mix * window + (1 - mix) * linear in one pass
    return torch.lerp(o_linear.float(), o_window.float(), mix).to(q_rot.dtype), state
