"""Chunked gated linear attention in Triton: forward and backward, on the shared chunk-state recurrence.

Semantics are those of `naive_recurrent_gla`:
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale S_t^T q_t,
with q `[B, T, H, K]`, k and g `[B, T, Hkv, K]`, v `[B, T, Hkv, V]`; query head h reads key head h // (H // Hkv).

Chunks of BT = 64 tokens, split into sub-blocks of BC = 16. With b_t the cumulative log decay since the chunk start
(`chunk_local_cumsum`, once) and S the state entering the chunk (`chunk_states`, the one sequential kernel):
    o_t = scale [(q_t * exp(b_t)) S + sum_{s <= t in the chunk} A_ts v_s],   A_ts = sum_k q_tk k_sk exp(b_tk - b_sk).
Every exponential has an exponent <= 0. A query sub-block i reaches the keys of earlier sub-blocks through the last
row r before it: exp(b_t - b_s) = exp(b_t - b_r) exp(b_r - b_s) makes that part of A one matmul; the pairs inside
the sub-block are summed one key at a time. Operands of every matmul are in the model dtype; accumulators, decays
and states are fp32.

Forward: cumsum, states, A (one program per query sub-block and head, written to a `[B, T, H, BT]` fp32 buffer),
outputs (one program per chunk, head and V block: (q * exp(b)) S + A v).

Backward (h and A recomputed rather than saved): the gradient of the state leaving every chunk
(`chunk_state_grads`), dA = scale do v^T, then the intra-chunk parts of dq and dk per sub-block, dv per chunk and
key head, and finally dq, dk and dg per chunk, key head and K block. The decay gradient uses no "q dq - k dk"
identity over all pairs, whose O(1) diagonal terms would cancel and leave rounding noise for strongly decayed
tokens. g_r scales exactly the interactions whose source precedes r and whose target is at or after r (elementwise
in k, sums over the query heads of the key head):
    dg_r = sum_{t >= r} q_t dq_inter_t                        (state entering the chunk -> its queries)
         + exp(b_L) sum_v S dS_next                           (state entering -> state leaving)
         + sum_{s < r} k_s dk_inter_s                         (the chunk's keys -> state leaving)
         + sum_{s < r <= t} q_t k_s exp(b_t - b_s) dA_ts      (the chunk's keys -> its queries)
with the last term as sum_{t >= r} q_t dq_strict_t - sum_{s >= r} k_s dk_strict_s, where the strict parts sum over
pairs s < t only: their terms are as decayed as the result.

Packed batches (cu_seqlens `[N + 1]`, B = 1) run the chunk-parallel kernels over every sequence's chunks
(`chunk_layout`), each chunk inside one sequence; the states restart at every boundary.
"""

import torch
import triton
import triton.language as tl

from ..common.chunk_state import (
    ChunkLayout,
    chunk_layout,
    chunk_local_cumsum,
    chunk_position,
    chunk_state_grads,
    chunk_states,
)
from ..common.launch import autotune, dot_precision, element_size, pow2
from .reference import check_inputs

CHUNK = 64  # BT
SUB = 16  # BC; tl.dot needs >= 16


@triton.jit(do_not_specialize=["T", "NT"])
def gla_fwd_intra_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, HKV, K]
    b,  # [B, T, HKV, K] fp32
    A,  # [B, T, H, BT] fp32
    cu_seqlens,
    chunk_indices,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_tc, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_seq, i_c, _ = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    c0 = i_c * BT
    t0 = c0 + i_i * BC
    if t0 >= T_seq:
        return
    o_i, o_t = tl.arange(0, BC), tl.arange(0, BT)
    rows_q, rows_k = t0 + o_i, c0 + o_t
    m_q = rows_q < T_seq
    m_s = rows_k < t0  # the keys of earlier sub-blocks
    r64q, r64k = bos + rows_q.to(tl.int64), bos + rows_k.to(tl.int64)

    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_qk = m_q[:, None] & m_k[None, :]
        b_q = tl.load(q + (r64q * H + i_h)[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
        b_bq = tl.load(b + (r64q * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
        if i_i > 0:
            # earlier sub-blocks through the row r before this one
            b_br = tl.load(b + ((bos + t0 - 1) * HKV + i_hk) * K + o_k, mask=m_k, other=0.0)
            m_sk = m_s[:, None] & m_k[None, :]
            b_k = tl.load(k + (r64k * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_sk, other=0.0)
            b_bk = tl.load(b + (r64k * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_sk, other=0.0)
            b_qs = (b_q * tl.exp(tl.where(m_qk, b_bq - b_br[None, :], float("-inf")))).to(b_k.dtype)
            b_ks = (b_k * tl.exp(tl.where(m_sk, b_br[None, :] - b_bk, float("-inf")))).to(b_k.dtype)
            b_A += tl.dot(b_qs, tl.trans(b_ks), input_precision=DOT_PREC)
        # the sub-block's own pairs, one key at a time
        b_qf = b_q.to(tl.float32)
        for j in range(0, tl.minimum(BC, T_seq - t0)):
            p_s = ((bos + t0 + j) * HKV + i_hk) * K + o_k
            b_ks1 = tl.load(k + p_s, mask=m_k, other=0.0).to(tl.float32)
            b_bs1 = tl.load(b + p_s, mask=m_k, other=0.0)
            on_or_after = ((o_i >= j) & m_q)[:, None] & m_k[None, :]
            b_decay = tl.exp(tl.where(on_or_after, b_bq - b_bs1[None, :], float("-inf")))
            b_col = tl.sum(b_qf * b_ks1[None, :] * b_decay, 1)
            b_Ad += tl.where(o_i[None, :] == j, b_col[:, None], 0.0)
    p_A = A + (r64q * H + i_h)[:, None] * BT
    tl.store(p_A + o_t[None, :], b_A, mask=m_q[:, None] & (o_t < i_i * BC)[None, :])
    tl.store(p_A + (i_i * BC + o_i)[None, :], b_Ad, mask=m_q[:, None])


def _output_shared(args: dict) -> int:
    e = element_size(args["q"])
    BT, BK, BV = args["BT"], args["BK"], args["BV"]
    return args["num_stages"] * BT * BK * (2 * e + 4) + BK * BV * (4 + e) + BT * BT * (4 + e) + BT * BV * e


@autotune(
    [
        triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
        triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2),
    ],
    key=["K", "V"],
    shared_estimate=_output_shared,
)
@triton.jit(do_not_specialize=["T", "NT"])
def gla_fwd_o_kernel(
    q,  # [B, T, H, K]
    v,  # [B, T, HKV, V]
    b,  # [B, T, HKV, K] fp32
    h,  # [total chunks, HKV, K, V] fp32
    A,  # [B, T, H, BT] fp32
    o,  # [B, T, H, V]
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_seq, i_c, flat = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = i_c * BT + o_t
    m_t = rows < T_seq
    r64 = bos + rows.to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (r64 * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_b = tl.load(b + (r64 * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        p_S = h + (flat * HKV + i_hk) * K * V + o_k[:, None].to(tl.int64) * V + o_v[None, :]
        b_S = tl.load(p_S, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_qg = (b_q * tl.exp(b_b)).to(b_q.dtype)
        b_o += tl.dot(b_qg, b_S.to(b_q.dtype), input_precision=DOT_PREC)
    causal = m_t[:, None] & (o_t[None, :] <= o_t[:, None])
    b_A = tl.load(A + (r64 * H + i_h)[:, None] * BT + o_t[None, :], mask=causal, other=0.0)
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + (r64 * HKV + i_hk)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=DOT_PREC)
    tl.store(o + (r64 * H + i_h)[:, None] * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T", "NT"])
def gla_bwd_dA_kernel(
    v,  # [B, T, HKV, V]
    do,  # [B, T, H, V]
    dA,  # [B, T, H, BT] fp32
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_seq, i_c, _ = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = i_c * BT + o_t
    m_t = rows < T_seq
    r64 = bos + rows.to(tl.int64)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + (r64 * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v + (r64 * HKV + i_hk)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_dA += tl.dot(b_do, tl.trans(b_v.to(b_do.dtype)), input_precision=DOT_PREC)
    causal = m_t[:, None] & (o_t[None, :] <= o_t[:, None])
    tl.store(dA + (r64 * H + i_h)[:, None] * BT + o_t[None, :], tl.where(causal, b_dA * scale, 0.0),
             mask=m_t[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["T", "NT"])
def gla_bwd_intra_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, HKV, K]
    b,  # [B, T, HKV, K] fp32
    dA,  # [B, T, H, BT] fp32
    dq,  # [B, T, H, K] fp32: sum_{s < t} dA_ts k_s exp(b_t - b_s)
    dk,  # [B, T, H, K] fp32: sum_{t > s} dA_ts q_t exp(b_t - b_s), per query head
    cu_seqlens,
    chunk_indices,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_tc, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_seq, i_c, _ = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    c0 = i_c * BT
    t0 = c0 + i_i * BC
    if t0 >= T_seq:
        return
    o_i, o_t = tl.arange(0, BC), tl.arange(0, BT)
    rows_i, rows_c = t0 + o_i, c0 + o_t
    m_i, m_c = rows_i < T_seq, rows_c < T_seq
    r64i, r64c = bos + rows_i.to(tl.int64), bos + rows_c.to(tl.int64)
    m_before = rows_c < t0  # keys of earlier sub-blocks
    m_after = m_c & (rows_c >= t0 + BC)  # queries of later sub-blocks
    has_after = t0 + BC < tl.minimum(c0 + BT, T_seq)

    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_ik = m_i[:, None] & m_k[None, :]
        b_bi = tl.load(b + (r64i * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_ik, other=0.0)
        b_dq = tl.zeros([BC, BK], dtype=tl.float32)
        b_dk = tl.zeros([BC, BK], dtype=tl.float32)
        if i_i > 0:
            # dq from the keys of earlier sub-blocks, through the row r before this one
            b_br = tl.load(b + ((bos + t0 - 1) * HKV + i_hk) * K + o_k, mask=m_k, other=0.0)
            m_sk = m_before[:, None] & m_k[None, :]
            b_k = tl.load(k + (r64c * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_sk, other=0.0)
            b_bk = tl.load(b + (r64c * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_sk, other=0.0)
            b_ks = (b_k * tl.exp(tl.where(m_sk, b_br[None, :] - b_bk, float("-inf")))).to(b_k.dtype)
            p_dA = dA + (r64i * H + i_h)[:, None] * BT + o_t[None, :]
            b_dAs = tl.load(p_dA, mask=m_i[:, None] & m_before[None, :], other=0.0)
            b_qdec = tl.exp(tl.where(m_ik, b_bi - b_br[None, :], float("-inf")))
            b_dq += b_qdec * tl.dot(b_dAs.to(b_k.dtype), b_ks, input_precision=DOT_PREC)
        if has_after:
            # dk from the queries of later sub-blocks, through this sub-block's last row r
            p_r = ((bos + t0 + BC - 1) * HKV + i_hk) * K + o_k
            b_br = tl.load(b + p_r, mask=m_k, other=0.0)
            m_qk = m_after[:, None] & m_k[None, :]
            b_q = tl.load(q + (r64c * H + i_h)[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
            b_bq = tl.load(b + (r64c * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
            b_qs = (b_q * tl.exp(tl.where(m_qk, b_bq - b_br[None, :], float("-inf")))).to(b_q.dtype)
            p_dA = dA + (r64c * H + i_h)[:, None] * BT + (i_i * BC + o_i)[None, :]
            b_dAt = tl.load(p_dA, mask=m_after[:, None], other=0.0)  # [BT(t), BC(s)]
            b_dk += tl.exp(b_br[None, :] - b_bi) * tl.dot(
                tl.trans(b_dAt.to(b_q.dtype)), b_qs, input_precision=DOT_PREC
            )  # fmt: skip
        # pairs inside the sub-block, one row j at a time: key j for dq, query j for dk
        for j in range(0, tl.minimum(BC, T_seq - t0)):
            r64j = bos + t0 + j
            b_kj = tl.load(k + (r64j * HKV + i_hk) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_qj = tl.load(q + (r64j * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_bj = tl.load(b + (r64j * HKV + i_hk) * K + o_k, mask=m_k, other=0.0)
            b_col = tl.load(dA + (r64i * H + i_h) * BT + i_i * BC + j, mask=m_i, other=0.0)  # dA[t, j]
            b_row = tl.load(dA + (r64j * H + i_h) * BT + i_i * BC + o_i)  # dA[j, s]
            later = ((o_i > j) & m_i)[:, None] & m_k[None, :]
            earlier = (o_i < j)[:, None] & m_k[None, :]
            b_dq += b_col[:, None] * b_kj[None, :] * tl.exp(tl.where(later, b_bi - b_bj[None, :], float("-inf")))
            b_dk += b_row[:, None] * b_qj[None, :] * tl.exp(tl.where(earlier, b_bj[None, :] - b_bi, float("-inf")))
        p_out = (r64i * H + i_h)[:, None] * K + o_k[None, :]
        tl.store(dq + p_out, b_dq, mask=m_ik)
        tl.store(dk + p_out, b_dk, mask=m_ik)


def _dv_shared(args: dict) -> int:
    e = element_size(args["do"])
    BT, BK, BV = args["BT"], args["BK"], args["BV"]
    return args["num_stages"] * (BT * BT * (4 + e) + BT * BV * e) + BT * BK * (2 * e + 4) + BK * BV * (4 + e)


@autotune(
    [
        triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
        triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2),
    ],
    key=["K", "V"],
    shared_estimate=_dv_shared,
)
@triton.jit(do_not_specialize=["T", "NT"])
def gla_bwd_dv_kernel(
    k,  # [B, T, HKV, K]
    b,  # [B, T, HKV, K] fp32
    A,  # [B, T, H, BT] fp32
    do,  # [B, T, H, V]
    dh,  # [total chunks, HKV, K, V] fp32: gradient of the state leaving each chunk
    dv,  # [B, T, HKV, V]
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    bos, T_seq, i_c, flat = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = i_c * BT + o_t
    m_t = rows < T_seq
    r64 = bos + rows.to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    causal = m_t[:, None] & (o_t[None, :] <= o_t[:, None])

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_g in range(0, H // HKV):
        i_h = i_hk * (H // HKV) + i_g
        b_A = tl.load(A + (r64 * H + i_h)[:, None] * BT + o_t[None, :], mask=causal, other=0.0)  # [BT(t), BT(s)]
        b_do = tl.load(do + (r64 * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_dv += tl.dot(tl.trans(b_A.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
    b_dv *= scale
    last = bos + tl.minimum(i_c * BT + BT, T_seq) - 1
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + (r64 * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_b = tl.load(b + (r64 * HKV + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_bl = tl.load(b + (last * HKV + i_hk) * K + o_k, mask=m_k, other=0.0)
        b_kd = (b_k * tl.exp(b_bl[None, :] - b_b)).to(b_k.dtype)
        p_dh = dh + (flat * HKV + i_hk) * K * V + o_k[:, None].to(tl.int64) * V + o_v[None, :]
        b_dh = tl.load(p_dh, mask=m_k[:, None] & (o_v < V)[None, :], other=0.0)
        b_dv += tl.dot(b_kd, b_dh.to(b_k.dtype), input_precision=DOT_PREC)
    tl.store(dv + (r64 * HKV + i_hk)[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


def _inter_shared(args: dict) -> int:
    e = element_size(args["q"])
    BT, BK, BV = args["BT"], args["BK"], args["BV"]
    return args["num_stages"] * (BT * BV * 2 * e + BK * BV * 4 * 2) + BT * BK * (e + 4 * 4)


@autotune(
    [
        # several [BT, BK] fp32 gradient tiles live at once: 32x64 blocks spill at 4 warps and 64x64 ones at 8 warps
        # (on sm_90 at head dim 64), so BK stays at 32
        triton.Config({"BK": 32, "BV": 32}, num_warps=4, num_stages=2),
        triton.Config({"BK": 32, "BV": 64}, num_warps=8, num_stages=2),
    ],
    key=["K", "V"],
    shared_estimate=_inter_shared,
)
@triton.jit(do_not_specialize=["T", "NT"])
def gla_bwd_inter_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, HKV, K]
    v,  # [B, T, HKV, V]
    b,  # [B, T, HKV, K] fp32
    h,  # [total chunks, HKV, K, V] fp32: the state entering each chunk
    do,  # [B, T, H, V]
    dh,  # [total chunks, HKV, K, V] fp32: gradient of the state leaving each chunk
    dA,  # [B, T, H, BT] fp32
    dq_strict,  # [B, T, H, K] fp32
    dk_strict,  # [B, T, H, K] fp32
    dq,  # [B, T, H, K]
    dk,  # [B, T, HKV, K]
    dg,  # [B, T, HKV, K]
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    bos, T_seq, i_c, flat = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = i_c * BT + o_t
    m_t = rows < T_seq
    r64 = bos + rows.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_kv = (r64 * HKV + i_hk)[:, None] * K + o_k[None, :]
    b_k = tl.load(k + p_kv, mask=m_tk, other=0.0)
    b_b = tl.load(b + p_kv, mask=m_tk, other=0.0)
    last = bos + tl.minimum(i_c * BT + BT, T_seq) - 1
    b_bl = tl.load(b + (last * HKV + i_hk) * K + o_k, mask=m_k, other=0.0)
    p_state = (flat * HKV + i_hk) * K * V + o_k[:, None].to(tl.int64) * V

    # through the state leaving the chunk: dk_inter and the S -> S_next part of dg
    b_dki = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgS = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (r64 * HKV + i_hk)[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :],
                      other=0.0)  # fmt: skip
        b_dh = tl.load(dh + p_state + o_v[None, :], mask=m_kv, other=0.0)
        b_S = tl.load(h + p_state + o_v[None, :], mask=m_kv, other=0.0)
        b_dki += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=DOT_PREC)
        b_dgS += tl.sum(b_S * b_dh, 1)
    b_dki *= tl.exp(b_bl[None, :] - b_b)
    b_dgS *= tl.exp(b_bl)

    b_qdec = tl.exp(b_b) * scale
    b_y = tl.zeros([BT, BK], dtype=tl.float32)  # sum over heads of q * (dq_inter + dq_strict)
    b_ws = tl.zeros([BT, BK], dtype=tl.float32)  # sum over heads of dk_strict
    b_dk = b_dki
    for i_g in range(0, H // HKV):
        i_h = i_hk * (H // HKV) + i_g
        b_dqi = tl.zeros([BT, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            b_do = tl.load(do + (r64 * H + i_h)[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :],
                           other=0.0)  # fmt: skip
            b_S = tl.load(h + p_state + o_v[None, :], mask=m_k[:, None] & (o_v < V)[None, :], other=0.0)
            b_dqi += tl.dot(b_do, tl.trans(b_S.to(b_do.dtype)), input_precision=DOT_PREC)
        b_dqi *= b_qdec
        p_q = (r64 * H + i_h)[:, None] * K + o_k[None, :]
        b_q = tl.load(q + p_q, mask=m_tk, other=0.0).to(tl.float32)
        b_dqs = tl.load(dq_strict + p_q, mask=m_tk, other=0.0)
        b_dks = tl.load(dk_strict + p_q, mask=m_tk, other=0.0)
        b_dAd = tl.load(dA + (r64 * H + i_h) * BT + o_t, mask=m_t, other=0.0)  # each query with its own key
        b_dq = b_dqi + b_dqs + b_dAd[:, None] * b_k.to(tl.float32)
        tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_y += b_q * (b_dqi + b_dqs)
        b_ws += b_dks
        b_dk += b_dks + b_dAd[:, None] * b_q
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    b_kf = b_k.to(tl.float32)
    b_w = b_kf * b_dki
    b_dg = tl.cumsum(b_y - b_kf * b_ws, axis=0, reverse=True) + tl.cumsum(b_w, axis=0) - b_w + b_dgS[None, :]
    tl.store(dg + p_kv, b_dg.to(dg.dtype.element_ty), mask=m_tk)


def _layout(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> ChunkLayout:
    return chunk_layout(q.shape[0], q.shape[1], CHUNK, cu_seqlens, q.device)


def _chunk_grid(layout: ChunkLayout, B: int, heads: int, per_chunk: int = 1) -> tuple[int, int]:
    """(programs over chunks, over batch rows * heads): every packed chunk with cu_seqlens, else one row's."""
    if layout.cu_seqlens is not None:
        return layout.total_chunks * per_chunk, heads
    return layout.NT * per_chunk, B * heads


def gla_intra(q, k, b, layout: ChunkLayout) -> torch.Tensor:
    """A `[B, T, H, BT]` fp32: each query's unscaled scores against the keys of its chunk up to itself."""
    B, T, H, K = q.shape
    A = torch.empty(B, T, H, CHUNK, dtype=torch.float32, device=q.device)
    gla_fwd_intra_kernel[_chunk_grid(layout, B, H, CHUNK // SUB)](
        q, k, b, A, layout.cu_seqlens, layout.chunk_indices, T, layout.NT,
        H=H, HKV=k.shape[2], K=K, BT=CHUNK, BC=SUB, BK=min(64, pow2(K)),
        IS_VARLEN=layout.cu_seqlens is not None, DOT_PREC=dot_precision(k.dtype), num_warps=4,
    )  # fmt: skip
    return A


def chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, layout: ChunkLayout):
    """Returns o `[B, T, H, V]` (q.dtype) and the final state (fp32) or None. Inputs are contiguous; q, k, v share
    one dtype, g is fp32."""
    B, T, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    b = chunk_local_cumsum(g, layout)
    h, _, ht = chunk_states(k, v, b, layout, initial_state=initial_state, output_final_state=output_final_state)
    A = gla_intra(q, k, b, layout)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    chunks, rows_heads = _chunk_grid(layout, B, H)
    gla_fwd_o_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), chunks, rows_heads)](
        q, v, b, h, A, o, layout.cu_seqlens, layout.chunk_indices, scale, T, layout.NT,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK, IS_VARLEN=layout.cu_seqlens is not None, DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return o, ht


def chunk_gla_bwd(q, k, v, g, initial_state, do, dht, scale, need_dh0, layout: ChunkLayout):
    """Returns dq, dk, dv in their inputs' dtypes, dg (fp32) and dh0 (fp32, or None)."""
    B, T, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    dev, varlen, prec = q.device, layout.cu_seqlens is not None, dot_precision(q.dtype)
    args = (layout.cu_seqlens, layout.chunk_indices)
    b = chunk_local_cumsum(g, layout)
    h, _, _ = chunk_states(k, v, b, layout, initial_state=initial_state)
    A = gla_intra(q, k, b, layout)
    dh, _, dh0 = chunk_state_grads(
        q, do, b, layout, state_heads=HKV, scale=scale, final_state_grad=dht, initial_state_grad=need_dh0
    )

    dA = torch.empty(B, T, H, CHUNK, dtype=torch.float32, device=dev)
    gla_bwd_dA_kernel[_chunk_grid(layout, B, H)](
        v, do, dA, *args, scale, T, layout.NT,
        H=H, HKV=HKV, V=V, BT=CHUNK, BV=min(64, pow2(V)), IS_VARLEN=varlen, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    dq_strict = torch.empty(B, T, H, K, dtype=torch.float32, device=dev)
    dk_strict = torch.empty_like(dq_strict)
    gla_bwd_intra_kernel[_chunk_grid(layout, B, H, CHUNK // SUB)](
        q, k, b, dA, dq_strict, dk_strict, *args, T, layout.NT,
        H=H, HKV=HKV, K=K, BT=CHUNK, BC=SUB, BK=min(64, pow2(K)), IS_VARLEN=varlen, DOT_PREC=prec, num_warps=4,
    )  # fmt: skip
    dv = torch.empty_like(v)
    chunks, rows_heads = _chunk_grid(layout, B, HKV)
    gla_bwd_dv_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), chunks, rows_heads)](
        k, b, A, do, dh, dv, *args, scale, T, layout.NT,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK, IS_VARLEN=varlen, DOT_PREC=prec,
    )  # fmt: skip
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = torch.empty(B, T, HKV, K, dtype=torch.float32, device=dev)
    gla_bwd_inter_kernel[lambda meta: (triton.cdiv(K, meta["BK"]), chunks, rows_heads)](
        q, k, v, b, h, do, dh, dA, dq_strict, dk_strict, dq, dk, dg, *args, scale, T, layout.NT,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK, IS_VARLEN=varlen, DOT_PREC=prec,
    )  # fmt: skip
    return dq, dk, dv, dg, dh0


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens=None):
        layout = _layout(q, cu_seqlens)
        o, ht = chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, layout)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.layout = scale, layout
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state = ctx.saved_tensors
        if dht is not None:
            dht = dht.float().contiguous()
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q, k, v, g, initial_state, do.to(q.dtype).contiguous(), dht, ctx.scale, initial_state is not None,
            ctx.layout,
        )  # fmt: skip
        return dq, dk, dv, dg, None, dh0, None, None


def triton_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with Triton kernels, differentiable w.r.t. q, k, v, g and initial_state.

    Args:
        q: queries `[B, T, H, K]`; k and v are multiplied in q's dtype (the model's), g and states in fp32.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads (query head h reads key head h // (H // Hkv)).
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros.
        output_final_state: whether to return the state after the last token.
        cu_seqlens: optional `[N + 1]` boundaries of N sequences packed along T (B must be 1); the state restarts
            at each one, initial_state and the final state are then `[N, Hkv, K, V]`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None. Gradients come back in
        their inputs' dtypes.
    """
    check_inputs(q, k, v, g, initial_state, cu_seqlens)  # rejects T = 0
    # one dtype for the matmul operands (a no-op in the usual case; autograd casts the gradients back)
    k, v = k.to(q.dtype), v.to(q.dtype)
    q, k, v, g = (x.contiguous() for x in (q, k, v, g.float()))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkGLAFunction.apply(q, k, v, g, float(scale), initial_state, output_final_state, cu_seqlens)
