"""Parallax attention in Triton: the forward kernel and the tile helpers the backward kernels share (host code and
autograd in parallax.triton, backward kernels in triton_bwd).

Keys are `[B, S, Hkv, D]` with S = P + T (the history first); query t sits at key position S - T + t and sees key j
iff j <= S - T + t, j > S - T + t - window and key_valid[b, j]. Query head h reads key head h // G.

Forward (FlashAttention-2 style, methods.md 4.6): one program per (block of BM queries, batch * query head) holds
its q and r tiles and streams only the key tiles its window reaches, once: two score products z = q k^T and
s = r k^T, an online softmax in the log2 domain (log2(e) folded into the scale, so exp2) that rescales all four
accumulators d1, d2, O1, O2 (fp32) by alpha = 2^(m_old - m_new), and two value products w v and (w s) v. The
running max starts finite, so a fully masked tile or row adds nothing and never gives NaN. Saves for the backward:
v_bar = O1 / d1 (fp32), t_bar = d2 / d1 and the log2-sum-exp per query, all `[B, T, H(, D)]`.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows(x, b64, rows, ok, L, NH, i_h, o_d, m_d, D: tl.constexpr):
    """Rows `rows` `[N]` of head i_h of a `[B, L, NH, D]` tensor as fp32 `[N, BD]`; rows with ~ok are never read
    (padding may hold anything, NaN included) and come back as zeros."""
    p = x + ((b64 * L + rows.to(tl.int64)) * NH + i_h)[:, None] * D + o_d[None, :]
    return tl.load(p, mask=ok[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _key_ok(key_valid, b64, cols, S, HAS_KEY_VALID: tl.constexpr):
    """Which key positions `cols` exist and are valid (not padding)."""
    ok = (cols >= 0) & (cols < S)
    if HAS_KEY_VALID:
        ok = ok & (tl.load(key_valid + b64 * S + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _visible(pos, cols, ok, m_rows, window):
    """[queries, keys]: key `cols` is in the window of the query at key position `pos`, valid, and the query real."""
    vis = (cols[None, :] <= pos[:, None]) & (cols[None, :] > pos[:, None] - window)
    return vis & ok[None, :] & m_rows[:, None]


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
    b_q = _load_rows(q, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    b_r = _load_rows(r, b64, o_m, m_m, T, H, i_h, o_d, m_d, D)
    pos = S - T + o_m  # key position of each query

    b_m = tl.full([BM], -1e30, dtype=tl.float32)
    b_d1 = tl.zeros([BM], dtype=tl.float32)
    b_d2 = tl.zeros([BM], dtype=tl.float32)
    b_o1 = tl.zeros([BM, BD], dtype=tl.float32)
    b_o2 = tl.zeros([BM, BD], dtype=tl.float32)
    first = S - T + i_m * BM
    lo = tl.maximum(first - window + 1, 0)
    for n0 in range((lo // BN) * BN, tl.minimum(first + BM, S), BN):
        o_n = n0 + tl.arange(0, BN)
        ok = _key_ok(key_valid, b64, o_n, S, HAS_KEY_VALID)
        b_k = _load_rows(k, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)
        b_v = _load_rows(v, b64, o_n, ok, S, HKV, i_hk, o_d, m_d, D)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        b_s = tl.dot(b_r, tl.trans(b_k), input_precision=DOT_PREC)
        vis = _visible(pos, o_n, ok, m_m, window)
        m_new = tl.maximum(b_m, tl.max(tl.where(vis, b_z, float("-inf")), 1))
        b_w = tl.exp2(tl.where(vis, b_z - m_new[:, None], float("-inf")))
        b_ws = b_w * b_s
        alpha = tl.exp2(b_m - m_new)
        b_d1 = b_d1 * alpha + tl.sum(b_w, 1)
        b_d2 = b_d2 * alpha + tl.sum(b_ws, 1)
        b_o1 = b_o1 * alpha[:, None] + tl.dot(b_w, b_v, input_precision=DOT_PREC)
        b_o2 = b_o2 * alpha[:, None] + tl.dot(b_ws, b_v, input_precision=DOT_PREC)
        b_m = m_new

    seen = b_d1 > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, b_d1, 1.0), 0.0)  # a query that sees no key gets o = 0
    b_vbar = b_o1 * inv[:, None]
    b_tbar = b_d2 * inv
    b_o = b_vbar * (1.0 + b_tbar[:, None]) - b_o2 * inv[:, None]
    row = (b64 * T + o_m.to(tl.int64)) * H + i_h
    m_md = m_m[:, None] & m_d[None, :]
    tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_md)
    if STORE_STATS:
        tl.store(v_bar + row[:, None] * D + o_d[None, :], b_vbar, mask=m_md)
        tl.store(t_bar + row, b_tbar, mask=m_m)
        # any finite value for a query without keys: all its probabilities are masked to zero in the backward
        tl.store(lse + row, tl.where(seen, b_m + tl.log2(tl.where(seen, b_d1, 1.0)), 0.0), mask=m_m)
