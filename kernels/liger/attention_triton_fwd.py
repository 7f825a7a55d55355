"""Fused Liger attention in Triton: forward kernels and the helpers the backward kernels share (host code and
autograd in attention_triton, backward kernels in attention_triton_bwd).

Semantics are those of `naive_liger_attention`: o = mix * window softmax over RoPE'd q/k + (1 - mix) * gated linear
attention over the feature-mapped q/k, v shared by both branches. Query t sits at window key position P + t after
P history keys; query head h reads key head h // G, G = H // Hkv.

Tiles: chunks of BT (64) tokens, split into sub-blocks of BC = 16. For the linear branch, with b_t the cumulative
log decay since the chunk start and S the state entering the chunk:
    o_lin_t = (q_t * exp(b_t)) S + sum_{s <= t in the chunk} (sum_k q_tk k_sk exp(b_tk - b_sk)) v_s.
Every exponent stays <= 0: for a key sub-block ending at e and a later query t, exp(b_t - b_s) = exp(b_t - b_e)
exp(b_e - b_s) makes the pair a matmul; queries inside the key sub-block take the [BC, BC, K] pairwise decay.

Kernels:
- states: one program per (batch, key head, V block) walks the chunks and saves the state entering each one (fp32).
- output: one program per (chunk, batch * query head) holds its BT queries (both feature maps) and streams key
  sub-blocks once: first the window's keys before the chunk (history included, read in place), then the chunk's
  own, each loaded once and used by both branches (window scores, intra-chunk gated attention, one shared v tile).
  It adds q S, mixes, and saves the window output and its log2-sum-exp for the backward.
The window may be any width; with the default 64 and BT = 64 a chunk reads its own and the previous chunk's keys.
"""

import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk (BT)
SUB = 16  # keys per sub-block (BC); tl.dot needs >= 16


@triton.jit
def _load_tokens(cur, past, b64, rows, T, P, HKV, i_hk, o_d, m_d, D: tl.constexpr, HAS_PAST: tl.constexpr):
    """Rows `rows` `[N]` of a `[B, T, HKV, D]` tensor as fp32 `[N, BD]`; a negative row -j is history row P - j of
    `past` `[B, P, HKV, D]`. Zeros outside both."""
    r64 = rows.to(tl.int64)
    m_cur = (rows >= 0) & (rows < T)
    p_cur = ((b64 * T + r64) * HKV + i_hk)[:, None] * D + o_d[None, :]
    x = tl.load(cur + p_cur, mask=m_cur[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if HAS_PAST:
        m_past = (rows < 0) & (rows >= -P)
        p_past = ((b64 * P + P + r64) * HKV + i_hk)[:, None] * D + o_d[None, :]
        x += tl.load(past + p_past, mask=m_past[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _key_ok(key_valid, b64, rows, T, P, HAS_KEY_VALID: tl.constexpr):
    """Which window keys at token rows `rows` exist and are valid (not padding)."""
    ok = (rows >= -P) & (rows < T)
    if HAS_KEY_VALID:
        ok = ok & (tl.load(key_valid + b64 * (P + T) + P + rows, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _window_visible(o_t, rows, ok, m_t, window):
    """[queries, keys]: key row s is in query t's window, valid, and t is a real query."""
    vis = (rows[None, :] <= o_t[:, None]) & (rows[None, :] > o_t[:, None] - window)
    return vis & ok[None, :] & m_t[:, None]


@triton.jit
def _softmax_step(b_qr, b_kr, b_v, vis, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One key block of the online softmax (log2 domain); a fully masked row keeps its finite m_i, adds nothing."""
    b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PREC) * qk_scale
    m_new = tl.maximum(m_i, tl.max(tl.where(vis, b_s, float("-inf")), 1))
    b_p = tl.exp2(tl.where(vis, b_s - m_new[:, None], float("-inf")))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p, b_v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["T", "NT"])
def liger_fwd_states_kernel(
    k_lin,  # [B, T, HKV, K]
    v,  # [B, T, HKV, V]
    g,  # [B, T, HKV, K]
    h0,  # [B, HKV, K, V]
    h,  # [B, NT, HKV, K, V] fp32: state entering each chunk
    ht,  # [B, HKV, K, V] fp32
    T,
    NT,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    is_last = o_t == BT - 1

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S += tl.load(h0 + (b64 * HKV + i_hk) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_n in range(0, NT):
        tl.store(h + ((b64 * NT + i_n) * HKV + i_hk) * K * V + o_state, b_S, mask=m_kv)
        rows = i_n * BT + o_t
        m_t = rows < T
        row_kv = (b64 * T + rows.to(tl.int64)) * HKV + i_hk
        b_k = tl.load(k_lin + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        # padded rows have g = 0, so b at the last row is b at the last real token
        b_b = tl.cumsum(b_g.to(tl.float32), axis=0)
        b_bl = tl.sum(tl.where(is_last[:, None], b_b, 0.0), axis=0)  # [BK]
        b_kend = b_k.to(tl.float32) * tl.exp(b_bl[None, :] - b_b)  # exponent <= 0
        b_S = b_S * tl.exp(b_bl)[:, None] + tl.dot(tl.trans(b_kend), b_v.to(tl.float32), input_precision=DOT_PREC)
    if STORE_FINAL_STATE:
        tl.store(ht + (b64 * HKV + i_hk) * K * V + o_state, b_S, mask=m_kv)


@triton.jit(do_not_specialize=["T", "P", "NT", "window"])
def liger_fwd_kernel(
    q_lin,  # [B, T, H, K]
    k_lin,  # [B, T, HKV, K]
    v,  # [B, T, HKV, D]
    g,  # [B, T, HKV, K]
    q_rot,  # [B, T, H, D]
    k_rot,  # [B, T, HKV, D]
    past_k,  # [B, P, HKV, D]
    past_v,  # [B, P, HKV, D]
    key_valid,  # [B, P + T] uint8
    h,  # [B, NT, HKV, K, D] fp32
    o,  # [B, T, H, D]
    o_win,  # [B, T, H, D] fp32
    lse,  # [B, T, H] fp32, log2 domain
    qk_scale,
    mix,
    T,
    P,
    NT,
    window,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    HAS_PAST: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    STORE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    m0 = i_n * BT
    o_t = m0 + tl.arange(0, BT)
    m_t = o_t < T
    o_c = tl.arange(0, BC)
    o_k, o_d = tl.arange(0, BK), tl.arange(0, BD)
    m_k, m_d = o_k < K, o_d < D
    row_q = (b64 * T + o_t.to(tl.int64)) * H + i_h  # [BT]
    row_kv = (b64 * T + o_t.to(tl.int64)) * HKV + i_hk

    b_ql = tl.load(q_lin + row_q[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_ql = b_ql.to(tl.float32)
    b_qr = tl.load(q_rot + row_q[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    b_qr = b_qr.to(tl.float32)
    b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_b = tl.cumsum(b_g.to(tl.float32), axis=0)  # [BT, BK]
    p_S = h + ((b64 * NT + i_n) * HKV + i_hk) * K * D + o_k[:, None].to(tl.int64) * D + o_d[None, :]
    b_S = tl.load(p_S, mask=m_k[:, None] & m_d[None, :], other=0.0)
    acc_l = tl.dot(b_ql * tl.exp(b_b), b_S, input_precision=DOT_PREC)  # [BT, BD]: the state entering the chunk

    m_i = tl.full([BT], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BT], dtype=tl.float32)
    acc_w = tl.zeros([BT, BD], dtype=tl.float32)

    # window keys before the chunk (earlier chunks, then history), in sub-blocks aligned to the chunk start
    first = tl.maximum(m0 - window + 1, -P)
    n_before = (m0 - first + BC - 1) // BC
    for s0 in range(m0 - n_before * BC, m0, BC):
        rows = s0 + o_c
        b_kr = _load_tokens(k_rot, past_k, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, HAS_PAST)
        b_v = _load_tokens(v, past_v, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, HAS_PAST)
        vis = _window_visible(o_t, rows, _key_ok(key_valid, b64, rows, T, P, HAS_KEY_VALID), m_t, window)
        m_i, l_i, acc_w = _softmax_step(b_qr, b_kr, b_v, vis, m_i, l_i, acc_w, qk_scale, DOT_PREC)

    # the chunk's own keys: both branches from one load of each tile
    causal = o_c[:, None] >= o_c[None, :]
    b_off = tl.zeros([BK], dtype=tl.float32)  # cumulative log decay before the sub-block
    for s0 in range(m0, tl.minimum(m0 + BT, T), BC):
        rows = s0 + o_c
        m_s = rows < T
        row_s = (b64 * T + rows.to(tl.int64)) * HKV + i_hk
        m_sk = m_s[:, None] & m_k[None, :]
        b_kr = _load_tokens(k_rot, past_k, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, False)
        b_v = _load_tokens(v, past_v, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, False)
        b_kl = tl.load(k_lin + row_s[:, None] * K + o_k[None, :], mask=m_sk, other=0.0).to(tl.float32)
        b_gs = tl.load(g + row_s[:, None] * K + o_k[None, :], mask=m_sk, other=0.0).to(tl.float32)
        vis = _window_visible(o_t, rows, _key_ok(key_valid, b64, rows, T, P, HAS_KEY_VALID), m_t, window)
        m_i, l_i, acc_w = _softmax_step(b_qr, b_kr, b_v, vis, m_i, l_i, acc_w, qk_scale, DOT_PREC)

        b_bs = b_off[None, :] + tl.cumsum(b_gs, axis=0)  # [BC, BK]
        b_be = tl.sum(tl.where((o_c == BC - 1)[:, None], b_bs, 0.0), axis=0)  # at the sub-block's last key
        # queries after the sub-block reach its keys through its last key e
        after = o_t > s0 + BC - 1
        b_qf = b_ql * tl.exp(tl.where(after[:, None], b_b - b_be[None, :], float("-inf")))
        b_A = tl.dot(b_qf, tl.trans(b_kl * tl.exp(b_be[None, :] - b_bs)), input_precision=DOT_PREC)  # [BT, BC]
        # queries inside the sub-block: pairwise decay, future pairs masked before the exp
        p_qd = q_lin + ((b64 * T + rows.to(tl.int64)) * H + i_h)[:, None] * K + o_k[None, :]
        b_qd = tl.load(p_qd, mask=m_sk, other=0.0).to(tl.float32)
        b_decay = tl.exp(tl.where(causal[:, :, None], b_bs[:, None, :] - b_bs[None, :, :], float("-inf")))
        b_Ad = tl.sum(b_qd[:, None, :] * b_kl[None, :, :] * b_decay, axis=2)  # [BC, BC]
        place = (o_t[:, None] == rows[None, :]).to(tl.float32)  # [BT, BC]: puts the pairwise rows in place
        b_A += tl.dot(place, b_Ad, input_precision=DOT_PREC)
        acc_l += tl.dot(b_A, b_v, input_precision=DOT_PREC)
        b_off = b_be

    seen = l_i > 0
    b_ow = acc_w / tl.where(seen, l_i, 1.0)[:, None]  # a query without keys has acc_w == 0: o_win == 0
    b_o = mix * b_ow + (1.0 - mix) * acc_l
    m_td = m_t[:, None] & m_d[None, :]
    tl.store(o + row_q[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_td)
    if STORE_WINDOW:
        tl.store(o_win + row_q[:, None] * D + o_d[None, :], b_ow, mask=m_td)
        # any finite value for a query without keys: all its probabilities are masked to zero in the backward
        tl.store(lse + row_q, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), 0.0), mask=m_t)
