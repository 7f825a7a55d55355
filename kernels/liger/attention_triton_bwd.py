"""Fused Liger attention in Triton: backward kernels (tiles and notation as in attention_triton_fwd).

- states: one program per (batch, key head, V block) walks the chunks in reverse and saves dH_n, the gradient of the
  state leaving chunk n (dH of the last chunk is dht; the one before the first is dh0):
      dH_{n-1} = exp(b_L) dH_n + (1 - mix) sum_heads (q_lin * exp(b))^T do   over chunk n.
- dq_rot: one program per (chunk, batch * query head), the window's dq pass (FlashAttention-2), history included.
- everything else: one program per (chunk, batch * key head) holds the chunk's keys (both kinds), values and decays
  and streams the chunk's query sub-blocks, for each of the G query heads: intra-chunk gated attention (dq_lin is
  complete there, as a chunk's queries only meet its own keys and the state entering it) and the window's dk/dv;
  then the later query sub-blocks whose windows reach the chunk's keys (window only), then the state terms.
  History keys get no gradient (the host falls back to the unfused kernels when they need one).

The decay gradient avoids the "q dq - k dk" identity on the diagonal pairs, whose O(1) terms would cancel and leave
rounding noise for strongly decayed tokens. g_r scales the interactions whose source precedes r and whose target is
at or after r, so (elementwise in k, sums over the G heads, M_ts = q_t k_s exp(b_t - b_s) dA_ts):
    dg_r = sum_{t >= r} q_t * dq_inter_t                 (state entering -> chunk's queries)
         + exp(b_L) sum_v S dH                            (state entering -> state leaving)
         + sum_{s < r} k_s * dk_inter_s                   (chunk's keys -> state leaving)
         + sum_{s < r <= t} M_ts                          (chunk's keys -> chunk's queries)
with the last term as sum_{t >= r} sum_{s < t} M_ts - sum_{s >= r} sum_{t > s} M_ts: strict pairs only, whose
terms are as decayed as the result.
"""

import triton
import triton.language as tl

from .attention_triton_fwd import _key_ok, _load_tokens, _window_visible


@triton.jit(do_not_specialize=["T", "NT"])
def liger_bwd_states_kernel(
    q_lin,  # [B, T, H, K]
    g,  # [B, T, HKV, K]
    do,  # [B, T, H, V]
    dht,  # [B, HKV, K, V]
    dh,  # [B, NT, HKV, K, V] fp32: gradient of the state leaving each chunk
    dh0,  # [B, HKV, K, V] fp32
    mix,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
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

    b_dH = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dH += tl.load(dht + (b64 * HKV + i_hk) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_i in range(0, NT):
        i_n = NT - 1 - i_i
        tl.store(dh + ((b64 * NT + i_n) * HKV + i_hk) * K * V + o_state, b_dH, mask=m_kv)
        rows = i_n * BT + o_t
        m_t = rows < T
        row_kv = (b64 * T + rows.to(tl.int64)) * HKV + i_hk
        b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_b = tl.cumsum(b_g.to(tl.float32), axis=0)
        b_bl = tl.sum(tl.where(is_last[:, None], b_b, 0.0), axis=0)
        b_qdec = tl.exp(b_b)
        b_dH = b_dH * tl.exp(b_bl)[:, None]
        for i_g in range(0, G):
            row_q = (b64 * T + rows.to(tl.int64)) * H + i_hk * G + i_g
            b_q = tl.load(q_lin + row_q[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_qs = b_q.to(tl.float32) * b_qdec * (1.0 - mix)
            b_dH += tl.dot(tl.trans(b_qs), b_do.to(tl.float32), input_precision=DOT_PREC)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + (b64 * HKV + i_hk) * K * V + o_state, b_dH, mask=m_kv)


@triton.jit(do_not_specialize=["T", "P", "window"])
def liger_bwd_dq_rot_kernel(
    q_rot,  # [B, T, H, D]
    k_rot,  # [B, T, HKV, D]
    v,  # [B, T, HKV, D]
    past_k,  # [B, P, HKV, D]
    past_v,  # [B, P, HKV, D]
    key_valid,  # [B, P + T] uint8
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32, log2 domain
    delta,  # [B, T, H] fp32: mix * do . o_win
    dq_rot,  # [B, T, H, D]
    scale,
    qk_scale,
    mix,
    T,
    P,
    window,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    HAS_PAST: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    m0 = i_n * BT
    o_t = m0 + tl.arange(0, BT)
    m_t = o_t < T
    o_c, o_d = tl.arange(0, BC), tl.arange(0, BD)
    m_d = o_d < D
    m_td = m_t[:, None] & m_d[None, :]
    row_q = (b64 * T + o_t.to(tl.int64)) * H + i_h
    b_qr = tl.load(q_rot + row_q[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    b_do = tl.load(do + row_q[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    b_lse = tl.load(lse + row_q, mask=m_t, other=0.0)
    b_delta = tl.load(delta + row_q, mask=m_t, other=0.0)
    b_dq = tl.zeros([BT, BD], dtype=tl.float32)

    first = tl.maximum(m0 - window + 1, -P)
    n_before = (m0 - first + BC - 1) // BC
    for s0 in range(m0 - n_before * BC, tl.minimum(m0 + BT, T), BC):
        rows = s0 + o_c
        b_kr = _load_tokens(k_rot, past_k, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, HAS_PAST)
        b_v = _load_tokens(v, past_v, b64, rows, T, P, HKV, i_hk, o_d, m_d, D, HAS_PAST)
        vis = _window_visible(o_t, rows, _key_ok(key_valid, b64, rows, T, P, HAS_KEY_VALID), m_t, window)
        b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PREC) * qk_scale
        b_p = tl.exp2(tl.where(vis, b_s - b_lse[:, None], float("-inf")))
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC) * mix
        b_dq += tl.dot(b_p * (b_dp - b_delta[:, None]), b_kr, input_precision=DOT_PREC)
    tl.store(dq_rot + row_q[:, None] * D + o_d[None, :], (b_dq * scale).to(dq_rot.dtype.element_ty), mask=m_td)


@triton.jit
def _window_key_grads(b_qr, b_do, b_dov, b_kr, b_lse, b_delta, vis, b_dv, b_dkr, qk_scale, mix, DOT_PREC: tl.constexpr):
    """Add one query sub-block's window gradients to the chunk's dv and (unscaled) dk_rot."""
    b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PREC) * qk_scale
    b_p = tl.exp2(tl.where(vis, b_s - b_lse[:, None], float("-inf")))  # [BC, BT]
    b_ds = b_p * (b_dov * mix - b_delta[:, None])
    b_dv += tl.dot(tl.trans(b_p), b_do, input_precision=DOT_PREC) * mix
    b_dkr += tl.dot(tl.trans(b_ds), b_qr, input_precision=DOT_PREC)
    return b_dv, b_dkr


@triton.jit(do_not_specialize=["T", "P", "NT", "window"])
def liger_bwd_kernel(
    q_lin,  # [B, T, H, K]
    k_lin,  # [B, T, HKV, K]
    v,  # [B, T, HKV, D]
    g,  # [B, T, HKV, K]
    q_rot,  # [B, T, H, D]
    k_rot,  # [B, T, HKV, D]
    key_valid,  # [B, P + T] uint8
    h,  # [B, NT, HKV, K, D] fp32: state entering each chunk
    dh,  # [B, NT, HKV, K, D] fp32: gradient of the state leaving each chunk
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32
    delta,  # [B, T, H] fp32
    dq_lin,  # [B, T, H, K]
    dk_lin,  # [B, T, HKV, K]
    dv,  # [B, T, HKV, D]
    dg,  # [B, T, HKV, K]
    dk_rot,  # [B, T, HKV, D]
    scale,
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
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)
    m0 = i_n * BT
    o_s = m0 + tl.arange(0, BT)  # the chunk's keys
    m_s = o_s < T
    o_c, o_k, o_d = tl.arange(0, BC), tl.arange(0, BK), tl.arange(0, BD)
    m_k, m_d = o_k < K, o_d < D
    m_sk, m_sd = m_s[:, None] & m_k[None, :], m_s[:, None] & m_d[None, :]
    row_s = (b64 * T + o_s.to(tl.int64)) * HKV + i_hk
    b_kl = tl.load(k_lin + row_s[:, None] * K + o_k[None, :], mask=m_sk, other=0.0).to(tl.float32)
    b_g = tl.load(g + row_s[:, None] * K + o_k[None, :], mask=m_sk, other=0.0).to(tl.float32)
    b_v = tl.load(v + row_s[:, None] * D + o_d[None, :], mask=m_sd, other=0.0).to(tl.float32)
    b_kr = tl.load(k_rot + row_s[:, None] * D + o_d[None, :], mask=m_sd, other=0.0).to(tl.float32)
    b_b = tl.cumsum(b_g, axis=0)
    b_bl = tl.sum(tl.where((o_s == m0 + BT - 1)[:, None], b_b, 0.0), axis=0)
    key_ok = _key_ok(key_valid, b64, o_s, T, P, HAS_KEY_VALID)
    o_state = ((b64 * NT + i_n) * HKV + i_hk) * K * D + o_k[:, None].to(tl.int64) * D + o_d[None, :]
    b_S = tl.load(h + o_state, mask=m_k[:, None] & m_d[None, :], other=0.0)

    b_dv = tl.zeros([BT, BD], dtype=tl.float32)
    b_dkr = tl.zeros([BT, BD], dtype=tl.float32)
    b_dkl = tl.zeros([BT, BK], dtype=tl.float32)  # intra-chunk part of dk_lin
    b_z = tl.zeros([BT, BK], dtype=tl.float32)  # q * (dq_inter + dq_strict) - k * dk_strict, summed over heads
    strict = o_c[:, None] > o_c[None, :]
    eye = o_c[:, None] == o_c[None, :]
    b_off = tl.zeros([BK], dtype=tl.float32)  # cumulative log decay before the query sub-block
    for r0 in range(m0, tl.minimum(m0 + BT, T), BC):
        o_r = r0 + o_c
        m_r = o_r < T
        m_rk = m_r[:, None] & m_k[None, :]
        row_r = (b64 * T + o_r.to(tl.int64)) * HKV + i_hk
        b_gr = tl.load(g + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
        b_kd = tl.load(k_lin + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
        b_br = b_off[None, :] + tl.cumsum(b_gr, axis=0)  # [BC, BK]
        # keys before the sub-block reach its queries through r0 - 1: exp(b_t - b_off) exp(b_off - b_s)
        b_kdec = tl.exp(tl.where((o_s < r0)[:, None], b_off[None, :] - b_b, float("-inf")))  # [BT, BK]
        b_kf = b_kl * b_kdec
        b_qdec = tl.exp(b_br - b_off[None, :])  # [BC, BK]
        b_decay = tl.exp(tl.where(strict[:, :, None], b_br[:, None, :] - b_br[None, :, :], float("-inf")))
        place = (o_r[:, None] == o_s[None, :]).to(tl.float32)  # [BC, BT]: sub-block row -> chunk row
        vis_lin = o_s[None, :] <= o_r[:, None]
        vis = _window_visible(o_r, o_s, key_ok, m_r, window)
        for i_g in range(0, G):
            row_q = (b64 * T + o_r.to(tl.int64)) * H + i_hk * G + i_g
            b_ql = tl.load(q_lin + row_q[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
            m_rd = m_r[:, None] & m_d[None, :]
            b_qr = tl.load(q_rot + row_q[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
            b_do = tl.load(do + row_q[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
            b_lse = tl.load(lse + row_q, mask=m_r, other=0.0)
            b_delta = tl.load(delta + row_q, mask=m_r, other=0.0)
            b_dov = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BC, BT]: do_t . v_s

            # linear branch, intra-chunk: A and dA over all the chunk's keys, the diagonal block pairwise
            b_qf = b_ql * b_qdec
            b_pair = tl.sum(b_ql[:, None, :] * b_kd[None, :, :] * b_decay, axis=2)  # [BC, BC], s < t
            b_pair += tl.where(eye, tl.sum(b_ql * b_kd, axis=1)[:, None], 0.0)
            b_A = tl.dot(b_qf, tl.trans(b_kf), input_precision=DOT_PREC)
            b_A += tl.dot(b_pair, place, input_precision=DOT_PREC)
            b_dv += tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) * (1.0 - mix)
            b_dA = tl.where(vis_lin, b_dov * (1.0 - mix), 0.0)  # [BC, BT]
            b_dAd = tl.dot(b_dA, tl.trans(place), input_precision=DOT_PREC)  # [BC, BC]: the diagonal block
            b_dA_tt = tl.sum(tl.where(eye, b_dAd, 0.0), axis=1)  # [BC]: each query with its own key

            b_dq_inter = tl.exp(b_br) * tl.dot(b_do, tl.trans(b_S), input_precision=DOT_PREC) * (1.0 - mix)
            b_dq_strict = b_qdec * tl.dot(b_dA, b_kf, input_precision=DOT_PREC)
            b_dq_strict += tl.sum(b_dAd[:, :, None] * b_kd[None, :, :] * b_decay, axis=1)
            b_dq = b_dq_inter + b_dq_strict + b_dA_tt[:, None] * b_kd
            tl.store(dq_lin + row_q[:, None] * K + o_k[None, :], b_dq.to(dq_lin.dtype.element_ty), mask=m_rk)

            b_dk_strict = b_kdec * tl.dot(tl.trans(b_dA), b_qf, input_precision=DOT_PREC)  # [BT, BK]
            b_dkd_strict = tl.sum(b_dAd[:, :, None] * b_ql[:, None, :] * b_decay, axis=0)  # [BC, BK]
            b_dk_strict += tl.dot(tl.trans(place), b_dkd_strict, input_precision=DOT_PREC)
            b_diag = tl.dot(tl.trans(place), b_dA_tt[:, None] * b_ql, input_precision=DOT_PREC)
            b_dkl += b_dk_strict + b_diag
            b_qdq = tl.dot(tl.trans(place), b_ql * (b_dq_inter + b_dq_strict), input_precision=DOT_PREC)
            b_z += b_qdq - b_kl * b_dk_strict

            b_dv, b_dkr = _window_key_grads(
                b_qr, b_do, b_dov, b_kr, b_lse, b_delta, vis, b_dv, b_dkr, qk_scale, mix, DOT_PREC
            )
        b_off = tl.sum(tl.where((o_c == BC - 1)[:, None], b_br, 0.0), axis=0)

    # later queries whose windows reach the chunk's keys: window branch only
    for r0 in range(m0 + BT, tl.minimum(m0 + BT + window - 1, T), BC):
        o_r = r0 + o_c
        m_r = o_r < T
        m_rd = m_r[:, None] & m_d[None, :]
        vis = _window_visible(o_r, o_s, key_ok, m_r, window)
        for i_g in range(0, G):
            row_q = (b64 * T + o_r.to(tl.int64)) * H + i_hk * G + i_g
            b_qr = tl.load(q_rot + row_q[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
            b_do = tl.load(do + row_q[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
            b_lse = tl.load(lse + row_q, mask=m_r, other=0.0)
            b_delta = tl.load(delta + row_q, mask=m_r, other=0.0)
            b_dov = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
            b_dv, b_dkr = _window_key_grads(
                b_qr, b_do, b_dov, b_kr, b_lse, b_delta, vis, b_dv, b_dkr, qk_scale, mix, DOT_PREC
            )

    # through the state leaving the chunk
    b_dH = tl.load(dh + o_state, mask=m_k[:, None] & m_d[None, :], other=0.0)
    b_kend = tl.exp(b_bl[None, :] - b_b)  # [BT, BK], exponent <= 0
    b_dk_inter = b_kend * tl.dot(b_v, tl.trans(b_dH), input_precision=DOT_PREC)
    b_dv += tl.dot(b_kl * b_kend, b_dH, input_precision=DOT_PREC)
    # decay gradient (module docstring): reverse sum of z, keys before r through the state leaving, S -> S_next
    before = (o_s[:, None] > o_s[None, :]).to(tl.float32)  # [BT(r), BT(s)]: s < r
    b_dg = tl.cumsum(b_z, axis=0, reverse=True)
    b_dg += tl.dot(before, b_kl * b_dk_inter, input_precision=DOT_PREC)
    b_dg += (tl.exp(b_bl) * tl.sum(b_S * b_dH, axis=1))[None, :]

    tl.store(dk_lin + row_s[:, None] * K + o_k[None, :], (b_dkl + b_dk_inter).to(dk_lin.dtype.element_ty), mask=m_sk)
    tl.store(dg + row_s[:, None] * K + o_k[None, :], b_dg.to(dg.dtype.element_ty), mask=m_sk)
    tl.store(dv + row_s[:, None] * D + o_d[None, :], b_dv.to(dv.dtype.element_ty), mask=m_sd)
    tl.store(dk_rot + row_s[:, None] * D + o_d[None, :], (b_dkr * scale).to(dk_rot.dtype.element_ty), mask=m_sd)
