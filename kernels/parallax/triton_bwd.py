"""Parallax attention in Triton: the backward kernels (tiles and notation as in triton_fwd; docs/methods.md §4.7).

With p = 2^(z log2(e) - lse) recomputed from the saved log2-sum-exp (`common.tiles.probabilities`),
a_ij = dO_i . v_j, and per query t_i = dO_i . o_i and b_i = dO_i . v_bar_i (computed by the host):
    gl_ij = p_ij (a_ij - t_i + (t_bar_i - s_ij)(a_ij - b_i))   (gradient of z_ij),
    gu_ij = -p_ij (a_ij - b_i)                                  (gradient of s_ij),
    dq_i = scale sum_j gl_ij k_j,  dr_i = sum_j gu_ij k_j,
    dk_j = scale sum_i gl_ij q_i + sum_i gu_ij r_i,  dv_j = sum_i p_ij (1 + t_bar_i - s_ij) dO_i.

- dq/dr: one program per (block of BM queries, batch * query head) over the key tiles of the forward.
- dk/dv: one program per (block of BN keys, batch * key head) over the G query heads of its group and only the
  query tiles whose windows reach its keys, so every key gradient has one writer and no atomics are needed. Both
  halves of dk go into one accumulator (scale folded into gl), so a program carries two `[BN, D]` fp32 tiles.

Every product multiplies model-dtype operands (the score gradients are cast to it, as the forward casts its
weights) into fp32 accumulators.
"""

import triton
import triton.language as tl

from ..common.tiles import band, load_rows, probabilities, store_rows, valid_rows


@triton.jit
def _score_grads(b_q, b_r, b_do, b_k, b_v, b_lse, b_tbar, b_t, b_b, vis, qk_scale, DOT_PREC: tl.constexpr):
    """gl, gu and the value weights c = p (1 + t_bar - s) of one `[queries, keys]` tile, in fp32."""
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p = probabilities(b_z, vis, b_lse)
    b_shift = b_tbar[:, None] - tl.dot(b_r, tl.trans(b_k), input_precision=DOT_PREC)  # t_bar - s
    b_amb = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC) - b_b[:, None]  # a - b
    b_gl = b_p * (b_amb + (b_b - b_t)[:, None] + b_shift * b_amb)
    return b_gl, -b_p * b_amb, b_p * (1.0 + b_shift)


@triton.jit
def _load_query_stats(lse, t_bar, t, b, row, m_rows):
    return (
        tl.load(lse + row, mask=m_rows, other=0.0),
        tl.load(t_bar + row, mask=m_rows, other=0.0),
        tl.load(t + row, mask=m_rows, other=0.0),
        tl.load(b + row, mask=m_rows, other=0.0),
    )


@triton.jit(do_not_specialize=["T", "S", "window"])
def parallax_bwd_dq_kernel(
    q,  # [B, T, H, D]
    r,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    key_valid,  # [B, S] uint8
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32, log2 domain
    t_bar,  # [B, T, H] fp32
    t,  # [B, T, H] fp32: dO . o
    b,  # [B, T, H] fp32: dO . v_bar
    dq,  # [B, T, H, D]
    dr,  # [B, T, H, D]
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
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = load_rows(q, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)  # [BM, BD]
    b_r = load_rows(r, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    b_do = load_rows(do, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    row = (b64 * T + o_m.to(tl.int64)) * H + i_h
    b_lse, b_tbar, b_t, b_b = _load_query_stats(lse, t_bar, t, b, row, m_m)
    pos = S - T + o_m

    b_dq = tl.zeros([BM, BD], dtype=tl.float32)  # sum gl k, scaled at the end
    b_dr = tl.zeros([BM, BD], dtype=tl.float32)
    first = S - T + i_m * BM
    lo = tl.maximum(first - window + 1, 0)
    for n0 in range((lo // BN) * BN, tl.minimum(first + BM, S), BN):
        o_n = n0 + tl.arange(0, BN)
        ok = valid_rows(key_valid, b64, o_n, S, HAS_KEY_VALID)
        b_k = load_rows(k, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)  # [BN, BD]
        b_v = load_rows(v, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)
        vis = band(pos, o_n, window) & ok[None, :]
        b_gl, b_gu, _ = _score_grads(b_q, b_r, b_do, b_k, b_v, b_lse, b_tbar, b_t, b_b, vis, qk_scale, DOT_PREC)
        b_dq = tl.dot(b_gl.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PREC)
        b_dr = tl.dot(b_gu.to(b_k.dtype), b_k, b_dr, input_precision=DOT_PREC)
    store_rows(dq, b_dq * scale, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    store_rows(dr, b_dr, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)


@triton.jit(do_not_specialize=["T", "S", "window"])
def parallax_bwd_dkdv_kernel(
    q,  # [B, T, H, D]
    r,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    key_valid,  # [B, S] uint8
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32, log2 domain
    t_bar,  # [B, T, H] fp32
    t,  # [B, T, H] fp32
    b,  # [B, T, H] fp32
    dk,  # [B, S, HKV, D]
    dv,  # [B, S, HKV, D]
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
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    ok = valid_rows(key_valid, b64, o_n, S, HAS_KEY_VALID)
    b_k = load_rows(k, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)  # [BN, BD]
    b_v = load_rows(v, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)

    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    # queries t whose window reaches a key j of the tile: j <= S - T + t < j + window
    lo = tl.maximum(n0 - (S - T), 0)
    hi = tl.minimum(n0 + BN - 1 - (S - T) + window, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        for m0 in range((lo // BM) * BM, hi, BM):
            o_m = m0 + tl.arange(0, BM)
            m_m = o_m < T
            b_q = load_rows(q, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)  # [BM, BD]
            b_r = load_rows(r, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
            b_do = load_rows(do, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
            row = (b64 * T + o_m.to(tl.int64)) * H + i_h
            b_lse, b_tbar, b_t, b_b = _load_query_stats(lse, t_bar, t, b, row, m_m)
            vis = band(S - T + o_m, o_n, window) & ok[None, :] & m_m[:, None]
            b_gl, b_gu, b_c = _score_grads(b_q, b_r, b_do, b_k, b_v, b_lse, b_tbar, b_t, b_b, vis, qk_scale, DOT_PREC)
            b_dk = tl.dot(tl.trans((b_gl * scale).to(b_q.dtype)), b_q, b_dk, input_precision=DOT_PREC)
            b_dk = tl.dot(tl.trans(b_gu.to(b_r.dtype)), b_r, b_dk, input_precision=DOT_PREC)
            b_dv = tl.dot(tl.trans(b_c.to(b_do.dtype)), b_do, b_dv, input_precision=DOT_PREC)
    m_n = o_n < S
    store_rows(dk, b_dk, b64, o_n, m_n, S, HKV, i_hk, o_d, m_d, D)
    store_rows(dv, b_dv, b64, o_n, m_n, S, HKV, i_hk, o_d, m_d, D)
