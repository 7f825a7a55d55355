"""Parallax attention in Triton: the forward kernel (host code and autograd in parallax.triton, backward kernels in
triton_bwd).

Keys are `[B, S, Hkv, D]` with S = P + T (the history first); query t sits at key position S - T + t and sees key j
iff j <= S - T + t, j > S - T + t - window and key_valid[b, j]. Query head h reads key head h // G.

Forward (FlashAttention-2 style, docs/methods.md §4.6): one program per (block of BM queries, batch * query head) holds
its q and r tiles and streams only the key tiles its window reaches, once. Per key tile: two score products
z = q k^T and s = r k^T; the shared online softmax (`common.tiles.online_softmax`, log2 domain: log2(e) folded
into the scale) gives the weights w = 2^(z - m), the rescale alpha and the running max m and sum d1 = sum w;
Parallax adds its own accumulators around it, d2 = sum w s, O1 = sum w v and O2 = sum (w s) v, rescaled by the same
alpha. The products multiply model-dtype operands (w and w s are cast to it, as FlashAttention casts its
probabilities) into fp32 accumulators. Saves for the backward: v_bar = O1 / d1 (fp32), t_bar = d2 / d1 and the
log2-sum-exp per query, all `[B, T, H(, D)]`.
"""

import triton
import triton.language as tl

from ..common.tiles import NEG_INIT, band, load_rows, log2_sum_exp, online_softmax, store_rows, valid_rows


@triton.jit(do_not_specialize=["T", "S", "window"])
def parallax_fwd_kernel(
    q,  # [B, T, H, D]
    r,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    key_valid,  # [B, S] uint8
    o,  # [B, T, H, D]
    v_bar,  # [B, T, H, D] fp32
    t_bar,  # [B, T, H] fp32
    lse,  # [B, T, H] fp32, log2 domain
    qk_scale,  # scale * log2(e)
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
    STORE_STATS: tl.constexpr,
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
    pos = S - T + o_m  # key position of each query (rows past T see something; they are never stored)

    b_m = tl.full([BM], NEG_INIT, dtype=tl.float32)
    b_d1 = tl.zeros([BM], dtype=tl.float32)
    b_d2 = tl.zeros([BM], dtype=tl.float32)
    b_o1 = tl.zeros([BM, BD], dtype=tl.float32)
    b_o2 = tl.zeros([BM, BD], dtype=tl.float32)
    first = S - T + i_m * BM
    lo = tl.maximum(first - window + 1, 0)
    for n0 in range((lo // BN) * BN, tl.minimum(first + BM, S), BN):
        o_n = n0 + tl.arange(0, BN)
        ok = valid_rows(key_valid, b64, o_n, S, HAS_KEY_VALID)
        b_k = load_rows(k, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)  # [BN, BD]
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        b_s = tl.dot(b_r, tl.trans(b_k), input_precision=DOT_PREC)
        b_w, alpha, b_m, b_d1 = online_softmax(b_z, band(pos, o_n, window) & ok[None, :], b_m, b_d1)
        b_ws = b_w * b_s
        b_d2 = b_d2 * alpha + tl.sum(b_ws, 1)
        b_v = load_rows(v, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)
        b_o1 = tl.dot(b_w.to(b_v.dtype), b_v, b_o1 * alpha[:, None], input_precision=DOT_PREC)
        b_o2 = tl.dot(b_ws.to(b_v.dtype), b_v, b_o2 * alpha[:, None], input_precision=DOT_PREC)

    seen = b_d1 > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, b_d1, 1.0), 0.0)  # a query that sees no key gets o = 0
    b_vbar = b_o1 * inv[:, None]
    b_tbar = b_d2 * inv
    store_rows(o, b_vbar * (1.0 + b_tbar[:, None]) - b_o2 * inv[:, None], b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    if STORE_STATS:
        store_rows(v_bar, b_vbar, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
        row = (b64 * T + o_m.to(tl.int64)) * H + i_h
        tl.store(t_bar + row, b_tbar, mask=m_m)
        tl.store(lse + row, log2_sum_exp(b_m, b_d1), mask=m_m)
