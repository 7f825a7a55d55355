"""Parallax attention in Triton: host code, autograd and the entry point (kernels in triton_fwd and triton_bwd, whose
docstrings give the algorithm and the gradients).

Forward: one kernel (outputs plus the statistics the backward needs). Backward: the per-query dot products
t = dO . o and b = dO . v_bar in torch, then one kernel for dq and dr, one for dk and dv. History keys are
concatenated in front of the new ones, so the kernels see one key sequence of S = P + T and the history gets its
gradients through the concatenation. Inputs of fp32, bf16 or fp16 are read as fp32; every accumulation is fp32.
"""

import math

import torch
import triton

from ..backend import dot_precision
from .reference import check_inputs, with_history
from .triton_bwd import parallax_bwd_dkdv_kernel, parallax_bwd_dq_kernel
from .triton_fwd import parallax_fwd_kernel

BLOCK_M = 64  # queries per program
BLOCK_N = 32  # keys per inner step
LOG2E = math.log2(math.e)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch_options(D: int) -> tuple[int, dict]:
    # tl.dot needs every dimension >= 16. Each program holds four fp32 [BLOCK_M, BD] tiles (q, r and two
    # accumulators): wide heads get more warps and no software pipelining (a guess, not yet measured on a GPU)
    BD = max(16, triton.next_power_of_2(D))
    return BD, {"num_warps": 8 if BD >= 128 else 4, "num_stages": 1 if BD >= 128 else 2}


def parallax_fwd(q, r, k, v, key_valid, scale, window, save, block_m, block_n):
    """Returns o `[B, T, H, D]` (q.dtype) and, if `save`, v_bar `[B, T, H, D]`, t_bar and the log2-sum-exp
    `[B, T, H]` (fp32; else None). Inputs are contiguous, k and v `[B, S, Hkv, D]`."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    BD, options = _launch_options(D)
    o = torch.empty_like(q)
    v_bar = torch.empty(B, T, H, D, dtype=torch.float32, device=q.device) if save else None
    t_bar, lse = (torch.empty(B, T, H, dtype=torch.float32, device=q.device) if save else None for _ in range(2))
    parallax_fwd_kernel[(triton.cdiv(T, block_m), B * H)](
        q, r, k, v, key_valid, o, v_bar, t_bar, lse, scale * LOG2E, T, S, window,
        H=H, HKV=HKV, G=H // HKV, D=D, BD=BD, BM=block_m, BN=block_n,
        HAS_KEY_VALID=key_valid is not None, STORE_STATS=save, DOT_PREC=dot_precision(q, r, k, v), **options,
    )  # fmt: skip
    return o, v_bar, t_bar, lse


def parallax_bwd(saved, do, scale, window, block_m, block_n):
    """Returns dq, dr, dk, dv in their inputs' dtypes."""
    q, r, k, v, key_valid, o, v_bar, t_bar, lse = saved
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    BD, options = _launch_options(D)
    t = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, H]
    b = (do.float() * v_bar).sum(-1).contiguous()
    dq, dr, dk, dv = (torch.empty_like(x) for x in (q, r, k, v))
    args = (q, r, k, v, key_valid, do, lse, t_bar, t, b)
    meta = dict(H=H, HKV=HKV, G=H // HKV, D=D, BD=BD, BM=block_m, BN=block_n, HAS_KEY_VALID=key_valid is not None)
    meta |= dict(DOT_PREC=dot_precision(q, r, k, v, do), **options)
    parallax_bwd_dq_kernel[(triton.cdiv(T, block_m), B * H)](*args, dq, dr, scale, scale * LOG2E, T, S, window, **meta)
    parallax_bwd_dkdv_kernel[(triton.cdiv(S, block_n), B * HKV)](
        *args, dk, dv, scale, scale * LOG2E, T, S, window, **meta
    )
    return dq, dr, dk, dv


class ParallaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, key_valid, scale, window, block_m, block_n):
        save = any(ctx.needs_input_grad[:4])
        o, v_bar, t_bar, lse = parallax_fwd(q, r, k, v, key_valid, scale, window, save, block_m, block_n)
        if save:
            ctx.save_for_backward(q, r, k, v, key_valid, o, v_bar, t_bar, lse)
            ctx.config = (scale, window, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        grads = parallax_bwd(ctx.saved_tensors, do.contiguous(), *ctx.config)
        return (*grads,) + (None,) * 5


def triton_parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Parallax attention with Triton kernels; arguments and returns as in `naive_parallax_attention`.

    Differentiable w.r.t. q, r, k, v, past_k and past_v. Inputs must be fp32, bf16 or fp16. `block_m` and
    `block_n` (powers of two >= 16) set the query and key tiles, for tests.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    tensors = (q, r, k, v) if past_k is None else (q, r, k, v, past_k, past_v)
    if any(x.dtype not in DTYPES for x in tensors):
        raise ValueError(f"the Triton path takes {DTYPES}, got {[x.dtype for x in tensors]}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    keys, values = with_history(k, v, past_k, past_v)
    S, D = keys.shape[1], q.shape[-1]
    window = S if window is None else min(int(window), S)  # no query sees more than S keys; keeps it within int32
    scale = D**-0.5 if scale is None else float(scale)
    if key_valid is not None:
        key_valid = key_valid.contiguous().view(torch.uint8)  # same bytes as bool, a plain integer pointer
    q, r, keys, values = (x.contiguous() for x in (q, r, keys, values))
    return ParallaxFunction.apply(q, r, keys, values, key_valid, scale, window, block_m, block_n)
