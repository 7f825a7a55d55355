"""Fused Liger attention in Triton: host code, autograd, and the entry point (kernels in attention_triton_fwd and
attention_triton_bwd, whose docstrings give the algorithm).

Forward: one kernel computes the chunk states, one the outputs (both branches and the mix, each key tile loaded once).
Backward: one kernel carries the state gradients in reverse, one computes dq_rot (the window's dq pass), one
everything else per chunk of keys. Inputs of any float dtype are read as fp32; states and every accumulation are fp32.

Fully fused with or without cached history keys (read in place) and for windows of any width. The one fallback:
when the history keys or values themselves need gradients (in the layer, only when training through a cache), the op
runs the unfused Triton GLA and window kernels instead.
"""

import math

import torch
import triton

from ..backend import dot_precision
from ..gla.triton import triton_chunk_gla
from ..window.triton import triton_sliding_window_attention
from .attention_triton_bwd import liger_bwd_dq_rot_kernel, liger_bwd_kernel, liger_bwd_states_kernel
from .attention_triton_fwd import CHUNK, SUB, liger_fwd_kernel, liger_fwd_states_kernel
from .reference import check_attention_inputs, window_keys

LOG2E = math.log2(math.e)


def _sizes(K: int, D: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16; the state kernels split V into blocks of at most 64
    BK, BD = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(D))
    return BK, BD, min(64, BD)


def _stages(BK: int, BD: int) -> int:
    # the loops stream several fp32 tiles at once: deep software pipelining of 128-wide tiles would need more shared
    # memory than a GPU has (a guess from the window kernel's numbers, not yet measured for these kernels)
    return 2 if max(BK, BD) <= 64 else 1


def liger_fwd(q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v, key_valid, h0, window, scale, mix, final, save, chunk):
    """Returns o `[B, T, H, D]` (q_rot.dtype), the final state or None, and for the backward (None unless `save`)
    the states entering the chunks `[B, NT, Hkv, K, D]`, the window output `[B, T, H, D]` and its log2-sum-exp
    `[B, T, H]` (fp32). Inputs are contiguous."""
    B, T, H, K = q_lin.shape
    HKV, D = v.shape[2], v.shape[3]
    P = 0 if past_k is None else past_k.shape[1]
    NT = triton.cdiv(T, chunk)
    BK, BD, BV = _sizes(K, D)
    dev = q_lin.device
    prec = dot_precision(q_lin, k_lin, v, g, q_rot, k_rot)
    h = torch.empty(B, NT, HKV, K, D, dtype=torch.float32, device=dev)
    ht = torch.empty(B, HKV, K, D, dtype=torch.float32, device=dev) if final else None
    liger_fwd_states_kernel[(triton.cdiv(D, BV), B * HKV)](
        k_lin, v, g, h0, h, ht, T, NT,
        HKV=HKV, K=K, V=D, BT=chunk, BK=BK, BV=BV,
        USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=final, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    o = torch.empty(B, T, H, D, dtype=q_rot.dtype, device=dev)
    o_win = torch.empty(B, T, H, D, dtype=torch.float32, device=dev) if save else None
    lse = torch.empty(B, T, H, dtype=torch.float32, device=dev) if save else None
    liger_fwd_kernel[(NT, B * H)](
        q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v, key_valid, h, o, o_win, lse,
        scale * LOG2E, mix, T, P, NT, window,
        H=H, HKV=HKV, G=H // HKV, K=K, D=D, BT=chunk, BC=SUB, BK=BK, BD=BD,
        HAS_PAST=P > 0, HAS_KEY_VALID=key_valid is not None, STORE_WINDOW=save, DOT_PREC=prec, num_warps=8,
        num_stages=_stages(BK, BD),
    )  # fmt: skip
    return o, ht, (h if save else None), o_win, lse


def liger_bwd(saved, do, dht, window, scale, mix, need_dh0, chunk):
    """Returns dq_lin, dk_lin, dv, dg, dq_rot, dk_rot in their inputs' dtypes and dh0 (fp32) or None."""
    q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v, key_valid, h, o_win, lse = saved
    B, T, H, K = q_lin.shape
    HKV, D = v.shape[2], v.shape[3]
    P = 0 if past_k is None else past_k.shape[1]
    NT = triton.cdiv(T, chunk)
    BK, BD, BV = _sizes(K, D)
    G = H // HKV
    prec = dot_precision(q_lin, k_lin, v, g, q_rot, k_rot, do)
    delta = (mix * (do.float() * o_win).sum(-1)).contiguous()  # [B, T, H]: sum_s p_ts dp_ts of the window

    dh = torch.empty_like(h)
    dh0 = torch.empty(B, HKV, K, D, dtype=torch.float32, device=do.device) if need_dh0 else None
    liger_bwd_states_kernel[(triton.cdiv(D, BV), B * HKV)](
        q_lin, g, do, dht, dh, dh0, mix, T, NT,
        H=H, HKV=HKV, G=G, K=K, V=D, BT=chunk, BK=BK, BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=need_dh0, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    dq_rot = torch.empty_like(q_rot)
    liger_bwd_dq_rot_kernel[(NT, B * H)](
        q_rot, k_rot, v, past_k, past_v, key_valid, do, lse, delta, dq_rot,
        scale, scale * LOG2E, mix, T, P, window,
        H=H, HKV=HKV, G=G, D=D, BT=chunk, BC=SUB, BD=BD,
        HAS_PAST=P > 0, HAS_KEY_VALID=key_valid is not None, DOT_PREC=prec, num_warps=4,
        num_stages=_stages(BK, BD),
    )  # fmt: skip
    dq_lin, dk_lin, dv, dg, dk_rot = (torch.empty_like(x) for x in (q_lin, k_lin, v, g, k_rot))
    liger_bwd_kernel[(NT, B * HKV)](
        q_lin, k_lin, v, g, q_rot, k_rot, key_valid, h, dh, do, lse, delta,
        dq_lin, dk_lin, dv, dg, dk_rot,
        scale, scale * LOG2E, mix, T, P, NT, window,
        H=H, HKV=HKV, G=G, K=K, D=D, BT=chunk, BC=SUB, BK=BK, BD=BD,
        HAS_KEY_VALID=key_valid is not None, DOT_PREC=prec, num_warps=8, num_stages=_stages(BK, BD),
    )  # fmt: skip
    return dq_lin, dk_lin, dv, dg, dq_rot, dk_rot, dh0


class LigerAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_lin, k_lin, v, g, q_rot, k_rot, h0, past_k, past_v, key_valid, window, scale, mix, final, chunk):
        save = any(ctx.needs_input_grad[:7])
        o, ht, h, o_win, lse = liger_fwd(
            q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v, key_valid, h0, window, scale, mix, final, save, chunk
        )
        if save:
            ctx.save_for_backward(q_lin, k_lin, v, g, q_rot, k_rot, past_k, past_v, key_valid, h, o_win, lse)
        ctx.config = (window, scale, mix, h0 is not None, chunk)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        window, scale, mix, has_h0, chunk = ctx.config
        if dht is not None:
            dht = dht.float().contiguous()
        *grads, dh0 = liger_bwd(ctx.saved_tensors, do.contiguous(), dht, window, scale, mix, has_h0, chunk)
        return (*grads, None if dh0 is None else dh0.to(ctx.h0_dtype)) + (None,) * 8


def _unfused(q_lin, k_lin, v, g, q_rot, k_rot, window, key_valid, past_k, past_v, scale, mix, h0, final):
    o_linear, state = triton_chunk_gla(q_lin, k_lin, v, g, initial_state=h0, output_final_state=final)
    keys, values = window_keys(k_rot, v, past_k, past_v, q_rot.dtype)
    o_window = triton_sliding_window_attention(q_rot, keys, values, window, key_valid, scale=scale)
    return (mix * o_window.float() + (1 - mix) * o_linear.float()).to(q_rot.dtype), state


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
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention with fused Triton kernels; arguments and returns as in `naive_liger_attention`.

    Differentiable w.r.t. q_lin, k_lin, v, g, q_rot, k_rot and initial_state (and past_k / past_v, through the
    unfused fallback). `chunk_size` (a power of two >= 16) sets the query tile, for tests.
    """
    check_attention_inputs(q_lin, k_lin, v, g, q_rot, k_rot, window, key_valid, past_k, past_v, initial_state)
    if chunk_size < SUB or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {SUB}, got {chunk_size}")
    if past_k is not None and past_k.shape[1] == 0:
        past_k = past_v = None
    args = (window, key_valid, past_k, past_v, scale, mix, initial_state, output_final_state)
    history_grad = past_k is not None and (past_k.requires_grad or past_v.requires_grad)
    if torch.is_grad_enabled() and history_grad:
        return _unfused(q_lin, k_lin, v, g, q_rot, k_rot, *args)
    T, D = q_rot.shape[1], q_rot.shape[3]
    P = 0 if past_k is None else past_k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    window = min(int(window), P + T)  # no query sees more than P + T keys; keeps the window within int32
    if key_valid is not None:
        key_valid = key_valid.contiguous().view(torch.uint8)  # same bytes as bool, a plain integer pointer
    if initial_state is not None:
        initial_state = initial_state.float()
    q_lin, k_lin, v, g, q_rot, k_rot, initial_state, past_k, past_v = (
        None if x is None else x.contiguous() for x in (q_lin, k_lin, v, g, q_rot, k_rot, initial_state, past_k, past_v)
    )
    return LigerAttentionFunction.apply(
        q_lin, k_lin, v, g, q_rot, k_rot, initial_state, past_k, past_v, key_valid,
        window, scale, float(mix), output_final_state, chunk_size,
    )  # fmt: skip
