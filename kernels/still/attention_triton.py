"""Fused STILL attention in Triton: host code, autograd, and the entry point (kernels in attention_triton_fwd and
attention_triton_bwd, whose docstrings give the algorithm and the gradients).

Forward: the salient keys of every chunk are listed by token index (torch, one host sync for the largest count),
one kernel computes the per-chunk linear states, one the outputs. Backward: one kernel carries the state gradients
in reverse, one computes the query-side gradients (dq, dq_feat, dgate), one the key-side ones (dk, dv, dk_feat).
Inputs of any float dtype are read as fp32; states, statistics and every accumulation are fp32. No [T, T] matrix:
a query chunk reads its own and the previous chunk's keys plus the listed salient keys.
"""

import math

import torch
import triton

from ..backend import dot_precision
from .attention_triton_bwd import still_bwd_key_kernel, still_bwd_query_kernel, still_bwd_states_kernel
from .attention_triton_fwd import NO_KEY, still_fwd_kernel, still_fwd_states_kernel
from .reference import check_inputs

LOG2E = math.log2(math.e)
SALIENT_BLOCK = 64  # salient slots per inner step of the forward and the query-side backward


def _pad(n: int) -> int:
    # tl.dot needs every dimension >= 16
    return max(16, triton.next_power_of_2(n))


def salient_slots(salient: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, int]:
    """The token index of every salient key of the chunks that queries read through the salient set.

    Args:
        salient: `[B, T, H]` bool, False at invalid positions.
        chunk_size: C.

    Returns:
        slots `[B, H, max(N - 2, 1) * S]` int32: chunk n's keys for head h in slots n * S .. n * S + S - 1, in token
        order, NO_KEY in unused slots; and S >= 1, the largest count in one chunk and head (a host sync).
    """
    B, T, H = salient.shape
    C = chunk_size
    n_old = max(-(-T // C) - 2, 0)  # chunks 0..N-3: only they are ever two chunks behind a query
    if n_old == 0:
        return torch.full((B, H, 1), NO_KEY.value, dtype=torch.int32, device=salient.device), 1
    old = salient[:, : n_old * C].reshape(B, n_old, C, H)
    S = max(int(old.sum(2).amax()), 1)
    order = torch.argsort((~old).to(torch.uint8), dim=2, stable=True)[:, :, :S]  # [B, n_old, S, H], salient first
    token = order + torch.arange(n_old, device=salient.device)[:, None, None] * C
    slots = torch.where(old.gather(2, order), token, NO_KEY.value)
    return slots.permute(0, 3, 1, 2).reshape(B, H, n_old * S).to(torch.int32).contiguous(), S


def _sizes(C: int, D: int, Dv: int, F: int) -> tuple[int, int, int, int, int]:
    # a chunk and the q/k and v head dims fit one tile each; features go in blocks of at most 64, and so do the V
    # columns of the state kernels (their [F block, V block] state tiles stay small)
    BV = _pad(Dv)
    return _pad(C), _pad(D), BV, min(64, _pad(F)), min(64, BV)


def still_fwd(q, k, v, q_feat, k_feat, gate, salient, slots, key_valid, config, save):
    """Returns o `[B, T, H, Dv]` (q.dtype) and, when `save`, what the backward reads: the states and normalizers
    `[B, N, H, F, Dv]`, `[B, N, H, F]` and per query the max (log2), the denominator and the argmax key. Inputs are
    contiguous."""
    C, S, scale, eps, salient_block = config
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], q_feat.shape[3]
    N = triton.cdiv(T, C)
    BC, BD, BV, BF, BVS = _sizes(C, D, Dv, F)
    dev = q.device
    prec = dot_precision(q, k, v, q_feat, k_feat, gate)
    h = torch.empty(B, N, H, F, Dv, dtype=torch.float32, device=dev)
    hn = torch.empty(B, N, H, F, dtype=torch.float32, device=dev)
    still_fwd_states_kernel[(triton.cdiv(F, BF), triton.cdiv(Dv, BVS), B * H)](
        k_feat, v, salient, key_valid, h, hn, T, C, N,
        H=H, HKV=Hkv, G=H // Hkv, F=F, DV=Dv, BC=BC, BF=BF, BV=BVS,
        HAS_KEY_VALID=key_valid is not None, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=dev)
    m, den, arg = (
        [torch.empty(B, T, H, dtype=dtype, device=dev) for dtype in (torch.float32, torch.float32, torch.int32)]
        if save
        else (None, None, None)
    )
    still_fwd_kernel[(N, B * H)](
        q, k, v, q_feat, gate, key_valid, slots, h, hn, o, m, den, arg,
        scale * LOG2E, eps, T, C, N, S, slots.shape[-1],
        H=H, HKV=Hkv, G=H // Hkv, D=D, DV=Dv, F=F, BC=BC, BS=salient_block, BD=BD, BV=BV, BF=BF,
        HAS_KEY_VALID=key_valid is not None, STORE_STATS=save, DOT_PREC=prec, num_warps=8,
    )  # fmt: skip
    return o, ((h, hn, m, den, arg) if save else None)


def still_bwd(saved, do, config):
    """Returns dq, dk, dv, dq_feat, dk_feat, dgate in their inputs' dtypes."""
    q, k, v, q_feat, k_feat, gate, salient, slots, key_valid, o, h, hn, m, den, arg = saved
    C, S, scale, eps, salient_block = config
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], q_feat.shape[3]
    G = H // Hkv
    N = triton.cdiv(T, C)
    BC, BD, BV, BF, BVS = _sizes(C, D, Dv, F)
    prec = dot_precision(q, k, v, q_feat, k_feat, gate, do)
    has_valid = key_valid is not None
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, H]

    dh, dhn = torch.empty_like(h), torch.empty_like(hn)
    still_bwd_states_kernel[(triton.cdiv(F, BF), triton.cdiv(Dv, BVS), B * H)](
        q_feat, gate, do, den, delta, key_valid, dh, dhn, T, C, N,
        H=H, F=F, DV=Dv, BC=BC, BF=BF, BV=BVS, HAS_KEY_VALID=has_valid, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    dq, dq_feat, dgate = (torch.empty_like(x) for x in (q, q_feat, gate))
    dm = torch.empty_like(den)
    still_bwd_query_kernel[(N, B * H)](
        q, k, v, q_feat, gate, key_valid, slots, h, hn, do, m, den, arg, delta, dq, dq_feat, dgate, dm,
        scale, scale * LOG2E, eps, T, C, N, S, slots.shape[-1],
        H=H, HKV=Hkv, G=G, D=D, DV=Dv, F=F, BC=BC, BS=salient_block, BD=BD, BV=BV, BF=BF,
        HAS_KEY_VALID=has_valid, DOT_PREC=prec, num_warps=8,
    )  # fmt: skip
    dk, dv, dk_feat = (torch.empty_like(x) for x in (k, v, k_feat))
    still_bwd_key_kernel[(N, B * Hkv)](
        q, k, v, k_feat, salient, key_valid, slots, dh, dhn, do, m, den, arg, delta, dm, dk, dv, dk_feat,
        scale, scale * LOG2E, T, C, N, S, slots.shape[-1],
        H=H, HKV=Hkv, G=G, D=D, DV=Dv, F=F, BC=BC, BSC=_pad(S), BD=BD, BV=BV, BF=BF,
        HAS_KEY_VALID=has_valid, DOT_PREC=prec, num_warps=8,
    )  # fmt: skip
    return dq, dk, dv, dq_feat, dk_feat, dgate


class StillAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gate, salient, slots, key_valid, config):
        save = any(ctx.needs_input_grad[:6])
        o, saved = still_fwd(q, k, v, q_feat, k_feat, gate, salient, slots, key_valid, config, save)
        if save:
            ctx.save_for_backward(q, k, v, q_feat, k_feat, gate, salient, slots, key_valid, o, *saved)
        ctx.config = config
        return o

    @staticmethod
    def backward(ctx, do):
        return *still_bwd(ctx.saved_tensors, do.contiguous(), ctx.config), None, None, None, None


def triton_still_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gate: torch.Tensor,
    salient: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    salient_block: int = SALIENT_BLOCK,
) -> torch.Tensor:
    """STILL attention with fused Triton kernels; arguments and returns as in `naive_still_attention`.

    Differentiable w.r.t. q, k, v, q_feat, k_feat and gate. `salient_block` (a power of two >= 16) sets how many
    salient keys a query chunk reads per step, for tests.
    """
    check_inputs(q, k, v, q_feat, k_feat, gate, salient, chunk_size, key_valid)
    if salient_block < 16 or salient_block & (salient_block - 1):
        raise ValueError(f"salient_block must be a power of two >= 16, got {salient_block}")
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    if key_valid is not None:
        salient = salient & key_valid[..., None]
        key_valid = key_valid.contiguous().view(torch.uint8)  # same bytes as bool, a plain integer pointer
    slots, S = salient_slots(salient, chunk_size)
    q, k, v, q_feat, k_feat, gate = (x.contiguous() for x in (q, k, v, q_feat, k_feat, gate))
    config = (chunk_size, S, scale, float(eps), salient_block)
    return StillAttentionFunction.apply(
        q, k, v, q_feat, k_feat, gate, salient.contiguous().view(torch.uint8), slots, key_valid, config
    )
