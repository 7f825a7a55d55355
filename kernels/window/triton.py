"""Sliding-window softmax attention with optional sink keys in Triton (FlashAttention-2 style), forward and backward.

Semantics are those of `naive_sliding_window_attention`: query t sits at key position i = S - T + t and sees key j
iff i - window < j <= i and key_valid[b, j], plus the sink keys e with sink_mask[b, t, e]; a query that sees no key
outputs zeros and gets zero gradients. Query head h reads key head h // (H // Hkv); K/V are never repeated.

Kernels (all accumulate in fp32, scores in the log2 domain so the softmax uses exp2):
- forward, one program per (block of BLOCK_M queries, batch * query head): online softmax over only the key blocks
  the block's window can reach, then the (at most 16, padded to 16) sink keys; saves the log2-sum-exp per query.
- dq pass, same grid: recomputes P from the saved LSE, accumulates dq over the same key blocks and the sinks, and
  writes this query block's partial dsink_k / dsink_v ([B, query blocks, H, E, D] fp32, summed afterwards in torch),
  so no atomics are needed.
- dk/dv pass, one program per (block of BLOCK_N keys, batch * key head): loops over the query heads of its group and
  only the query blocks whose windows reach its keys.
"""

import math

import torch
import triton
import triton.language as tl

from ..backend import dot_precision
from .reference import check_inputs

BLOCK_M = 64  # queries per program
BLOCK_N = 32  # keys per inner step
LOG2E = math.log2(math.e)


@triton.jit(do_not_specialize=["T", "S", "window", "E"])
def window_attn_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    key_valid,
    sink_k,
    sink_v,
    sink_mask,
    qk_scale,
    T,
    S,
    window,
    E,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BE: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_qd = m_m[:, None] & m_d[None, :]
    p_q = ((b64 * T + o_m.to(tl.int64)) * H + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_qd, other=0.0)
    pos = S - T + o_m  # absolute key index of each query

    b_mi = tl.full([BM], -1e30, dtype=tl.float32)  # finite: a fully masked tile leaves it unchanged, no NaN
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)

    first = S - T + i_m * BM
    lo = tl.maximum(first - window + 1, 0)
    hi = tl.minimum(first + BM, S)
    start = (lo // BN) * BN
    for n0 in range(start, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < S
        p_kv = ((b64 * S + o_n.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
        m_kd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_kd, other=0.0)
        b_v = tl.load(v + p_kv, mask=m_kd, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        vis = (o_n[None, :] <= pos[:, None]) & (o_n[None, :] > pos[:, None] - window) & m_n[None, :] & m_m[:, None]
        if HAS_KEY_VALID:
            b_kv = tl.load(key_valid + b64 * S + o_n, mask=m_n, other=0)
            vis = vis & (b_kv != 0)[None, :]
        b_mn = tl.maximum(b_mi, tl.max(tl.where(vis, b_s, float("-inf")), 1))
        b_p = tl.exp2(tl.where(vis, b_s - b_mn[:, None], float("-inf")))
        b_alpha = tl.exp2(b_mi - b_mn)
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_mi = b_mn

    if HAS_SINKS:
        o_e = tl.arange(0, BE)
        m_e = o_e < E
        p_e = ((b64 * E + o_e.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
        m_ed = m_e[:, None] & m_d[None, :]
        b_k = tl.load(sink_k + p_e, mask=m_ed, other=0.0)
        b_v = tl.load(sink_v + p_e, mask=m_ed, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        vis = m_m[:, None] & m_e[None, :]
        if HAS_SINK_MASK:
            p_sm = (b64 * T + o_m.to(tl.int64))[:, None] * E + o_e[None, :]
            vis = vis & (tl.load(sink_mask + p_sm, mask=vis, other=0) != 0)
        b_mn = tl.maximum(b_mi, tl.max(tl.where(vis, b_s, float("-inf")), 1))
        b_p = tl.exp2(tl.where(vis, b_s - b_mn[:, None], float("-inf")))
        b_alpha = tl.exp2(b_mi - b_mn)
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_mi = b_mn

    seen = b_li > 0
    b_o = b_acc / tl.where(seen, b_li, 1.0)[:, None]  # a query without keys has acc == 0: o == 0
    tl.store(o + p_q, b_o.to(o.dtype.element_ty), mask=m_qd)
    # any finite LSE for a query without keys: every P entry of it is masked to zero in the backward
    b_lse = tl.where(seen, b_mi + tl.log2(tl.where(seen, b_li, 1.0)), 0.0)
    tl.store(lse + (b64 * H + i_h) * T + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["T", "S", "window", "E", "NM"])
def window_attn_bwd_kernel_dq(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    dsk,
    dsv,
    key_valid,
    sink_k,
    sink_v,
    sink_mask,
    scale,
    qk_scale,
    T,
    S,
    window,
    E,
    NM,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BE: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_qd = m_m[:, None] & m_d[None, :]
    p_q = ((b64 * T + o_m.to(tl.int64)) * H + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_qd, other=0.0)
    b_do = tl.load(do + p_q, mask=m_qd, other=0.0)
    p_l = (b64 * H + i_h) * T + o_m
    b_lse = tl.load(lse + p_l, mask=m_m, other=0.0)
    b_delta = tl.load(delta + p_l, mask=m_m, other=0.0)
    pos = S - T + o_m
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)

    first = S - T + i_m * BM
    lo = tl.maximum(first - window + 1, 0)
    hi = tl.minimum(first + BM, S)
    start = (lo // BN) * BN
    for n0 in range(start, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < S
        p_kv = ((b64 * S + o_n.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
        m_kd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_kd, other=0.0)
        b_v = tl.load(v + p_kv, mask=m_kd, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        vis = (o_n[None, :] <= pos[:, None]) & (o_n[None, :] > pos[:, None] - window) & m_n[None, :] & m_m[:, None]
        if HAS_KEY_VALID:
            b_kv = tl.load(key_valid + b64 * S + o_n, mask=m_n, other=0)
            vis = vis & (b_kv != 0)[None, :]
        b_p = tl.exp2(tl.where(vis, b_s - b_lse[:, None], float("-inf")))
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)

    if HAS_SINKS:
        o_e = tl.arange(0, BE)
        m_e = o_e < E
        p_e = ((b64 * E + o_e.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
        m_ed = m_e[:, None] & m_d[None, :]
        b_k = tl.load(sink_k + p_e, mask=m_ed, other=0.0)
        b_v = tl.load(sink_v + p_e, mask=m_ed, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        vis = m_m[:, None] & m_e[None, :]
        if HAS_SINK_MASK:
            p_sm = (b64 * T + o_m.to(tl.int64))[:, None] * E + o_e[None, :]
            vis = vis & (tl.load(sink_mask + p_sm, mask=vis, other=0) != 0)
        b_p = tl.exp2(tl.where(vis, b_s - b_lse[:, None], float("-inf")))
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)
        # this query block's share of dsink_k / dsink_v, summed over blocks and heads afterwards
        b_dsk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PREC) * scale  # [BE, BD]
        b_dsv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
        p_part = (((b64 * NM + i_m) * H + i_h) * BE + o_e)[:, None] * BD + o_d[None, :]
        tl.store(dsk + p_part, b_dsk)
        tl.store(dsv + p_part, b_dsv)

    tl.store(dq + p_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_qd)


@triton.jit(do_not_specialize=["T", "S", "window"])
def window_attn_bwd_kernel_dkdv(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    key_valid,
    scale,
    qk_scale,
    T,
    S,
    window,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)

    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < S
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_kd = m_n[:, None] & m_d[None, :]
    p_kv = ((b64 * S + o_n.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kd, other=0.0)
    b_v = tl.load(v + p_kv, mask=m_kd, other=0.0)
    key_ok = m_n
    if HAS_KEY_VALID:
        key_ok = key_ok & (tl.load(key_valid + b64 * S + o_n, mask=m_n, other=0) != 0)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # queries t whose window reaches key j: j <= S - T + t < j + window
    lo = tl.maximum(i_n * BN - (S - T), 0)
    hi = tl.minimum(i_n * BN + BN - 1 - (S - T) + window, T)
    start = (lo // BM) * BM
    for g in range(G):
        i_h = i_hk * G + g
        for m0 in range(start, hi, BM):
            o_m = m0 + tl.arange(0, BM)
            m_m = o_m < T
            m_qd = m_m[:, None] & m_d[None, :]
            p_q = ((b64 * T + o_m.to(tl.int64)) * H + i_h)[:, None] * D + o_d[None, :]
            b_q = tl.load(q + p_q, mask=m_qd, other=0.0)
            b_do = tl.load(do + p_q, mask=m_qd, other=0.0)
            p_l = (b64 * H + i_h) * T + o_m
            b_lse = tl.load(lse + p_l, mask=m_m, other=0.0)
            b_delta = tl.load(delta + p_l, mask=m_m, other=0.0)
            pos = S - T + o_m
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
            vis = (o_n[None, :] <= pos[:, None]) & (o_n[None, :] > pos[:, None] - window)
            vis = vis & key_ok[None, :] & m_m[:, None]
            b_p = tl.exp2(tl.where(vis, b_s - b_lse[:, None], float("-inf")))
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PREC)

    tl.store(dk + p_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_kd)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kd)


def _sizes(D: int, E: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(max(E, 1)))


def _stages(q: torch.Tensor, BD: int) -> int:
    # software-pipelining depth: fp32 tiles of 128 columns at 3 stages need ~173 KB of shared memory (dk/dv pass),
    # more than an A100 has
    row_bytes = q.element_size() * BD
    return 3 if row_bytes <= 256 else 2 if row_bytes <= 512 else 1


def _flags(key_valid, sink_k, sink_mask):
    return {
        "HAS_KEY_VALID": key_valid is not None,
        "HAS_SINKS": sink_k is not None,
        "HAS_SINK_MASK": sink_mask is not None,
    }


def window_attn_fwd(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale):
    """Returns o `[B, T, H, D]` (q.dtype) and the log2-sum-exp `[B, H, T]` (fp32). Inputs are contiguous."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    E = 0 if sink_k is None else sink_k.shape[1]
    BD, BE = _sizes(D, E)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    window_attn_fwd_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q,
        k,
        v,
        o,
        lse,
        key_valid,
        sink_k,
        sink_v,
        sink_mask,
        scale * LOG2E,
        T,
        S,
        window,
        E,
        H=H,
        HKV=HKV,
        G=H // HKV,
        D=D,
        BD=BD,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BE=BE,
        **_flags(key_valid, sink_k, sink_mask),
        DOT_PREC=dot_precision(q, k, v),
        num_warps=4,
        num_stages=_stages(q, BD),
    )
    return o, lse


def window_attn_bwd(q, k, v, o, lse, do, window, key_valid, sink_k, sink_v, sink_mask, scale):
    """Returns dq, dk, dv, dsink_k, dsink_v (the last two None without sinks), in their inputs' dtypes."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    E = 0 if sink_k is None else sink_k.shape[1]
    BD, BE = _sizes(D, E)
    NM = triton.cdiv(T, BLOCK_M)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    prec = dot_precision(q, k, v, do)
    if sink_k is not None:
        dsk = torch.empty(B, NM, H, BE, BD, dtype=torch.float32, device=q.device)
        dsv = torch.empty_like(dsk)
    else:
        dsk = dsv = None
    window_attn_bwd_kernel_dq[(NM, B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        dsk,
        dsv,
        key_valid,
        sink_k,
        sink_v,
        sink_mask,
        scale,
        scale * LOG2E,
        T,
        S,
        window,
        E,
        NM,
        H=H,
        HKV=HKV,
        G=H // HKV,
        D=D,
        BD=BD,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BE=BE,
        **_flags(key_valid, sink_k, sink_mask),
        DOT_PREC=prec,
        num_warps=4,
        num_stages=_stages(q, BD),
    )
    window_attn_bwd_kernel_dkdv[(triton.cdiv(S, BLOCK_N), B * HKV)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        key_valid,
        scale,
        scale * LOG2E,
        T,
        S,
        window,
        H=H,
        HKV=HKV,
        G=H // HKV,
        D=D,
        BD=BD,
        BM=BLOCK_M,
        BN=BLOCK_N,
        HAS_KEY_VALID=key_valid is not None,
        DOT_PREC=prec,
        num_warps=4,
        num_stages=_stages(q, BD),
    )
    dsink_k = dsink_v = None
    if sink_k is not None:
        # [B, NM, Hkv, G, E, D] summed over query blocks and the heads of each group -> [B, E, Hkv, D]
        dsink_k, dsink_v = (
            x[..., :E, :D].view(B, NM, HKV, H // HKV, E, D).sum((1, 3)).transpose(1, 2).to(sink_k.dtype)
            for x in (dsk, dsv)
        )
    return dq, dk, dv, dsink_k, dsink_v


def _as_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.contiguous().view(torch.uint8)


class SlidingWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale):
        q, k, v = (x.contiguous() for x in (q, k, v))
        if sink_k is not None:
            sink_k, sink_v = sink_k.contiguous(), sink_v.contiguous()
        key_valid, sink_mask = _as_bytes(key_valid), _as_bytes(sink_mask)
        o, lse = window_attn_fwd(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_valid, sink_k, sink_v, sink_mask)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_valid, sink_k, sink_v, sink_mask = ctx.saved_tensors
        dq, dk, dv, dsink_k, dsink_v = window_attn_bwd(
            q, k, v, o, lse, do.contiguous(), ctx.window, key_valid, sink_k, sink_v, sink_mask, ctx.scale
        )
        return dq, dk, dv, None, None, dsink_k, dsink_v, None, None


def triton_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the last `window` keys up to itself, plus optional sink keys, in Triton.

    Differentiable w.r.t. q, k, v, sink_k and sink_v.

    Args:
        q: queries `[B, T, H, D]`; they are the last T of the S key positions.
        k: keys `[B, S, Hkv, D]` with S >= T, shared by H // Hkv query heads.
        v: values `[B, S, Hkv, D]`.
        window: keys visible per query, counting its own token (>= 1).
        key_valid: `[B, S]` bool, False for keys nobody may see (padding); None means all valid.
        sink_k: extra keys `[B, E, Hkv, D]` outside the window, or None.
        sink_v: extra values `[B, E, Hkv, D]`, given together with sink_k.
        sink_mask: `[B, T, E]` bool, which extra keys each query sees; None means all of them.
        scale: score multiplier, default D ** -0.5.

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    check_inputs(q, k, v, window, key_valid, sink_k, sink_v, sink_mask)
    B, T, H, D = q.shape
    S = k.shape[1]
    if sink_k is not None:
        E = sink_k.shape[1]
        if E == 0:
            sink_k = sink_v = sink_mask = None
    if T == 0:
        return q.new_zeros(q.shape)
    # the kernels multiply operands of one dtype (a no-op in the usual case; autograd casts the gradients back)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if sink_k is not None:
        sink_k, sink_v = sink_k.to(q.dtype), sink_v.to(q.dtype)
    scale = D**-0.5 if scale is None else float(scale)
    window = min(int(window), S)  # no query sees more than S keys; keeps the window within int32
    if key_valid is not None:
        key_valid = key_valid.to(torch.bool)
    if sink_mask is not None:
        sink_mask = sink_mask.to(torch.bool)
    return SlidingWindowAttentionFunction.apply(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale)
