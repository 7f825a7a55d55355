"""Liger attention over a sequence in Triton: the GLA op's kernels for the linear branch (scale 1, the state carried
in and out), the sliding-window op's kernels for the window branch over the history keys followed by the new ones,
then the mix in fp32. The chunk-state recurrence and the sliding-window online softmax are written once
(gla/triton.py on common/chunk_state.py, window/triton.py on common/tiles.py) and Liger reuses both; autograd
differentiates through them, the history keys and values included.
"""

import torch

from ..gla.triton import triton_chunk_gla
from ..window.triton import triton_sliding_window_attention
from .reference import check_attention_inputs, window_keys


def triton_liger_attention(
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
    mix: float = 0.5,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention with the GLA and sliding-window Triton ops; arguments and returns as in `liger_attention`.

    Differentiable w.r.t. q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v and initial_state. The linear branch
    multiplies in q_lin's dtype and the window branch in q_rot's (the model's, for tensor cores), both accumulating
    in fp32; g and the states stay fp32.
    """
    check_attention_inputs(q_lin, k_lin, v, g, q_rot, k_rot, window, key_valid, past_k, past_v, initial_state)
    o_linear, state = triton_chunk_gla(
        q_lin, k_lin, v, g, scale=1.0, initial_state=initial_state, output_final_state=output_final_state
    )
    keys, values = window_keys(k_rot, v, past_k, past_v, q_rot.dtype)  # [B, P + T, Hkv, D]
    o_window = triton_sliding_window_attention(q_rot, keys, values, window, key_valid, scale=scale)
    return (mix * o_window.float() + (1 - mix) * o_linear.float()).to(q_rot.dtype), state
