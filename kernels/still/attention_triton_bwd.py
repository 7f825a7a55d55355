"""Fused STILL attention in Triton: backward kernels (tiles, slots and notation as in attention_triton_fwd).

With p_tj = e^(z_tj - m_t) over S_t, u_t = state_t^T q_feat_t, den_t the saved denominator and delta_t = do_t . o_t:
    e_t = gate_t * do_t / den_t            (gradient of q_feat_t^T state_t)
    dden_t = -delta_t / den_t              (gradient of the denominator)
    dp_tj = do_t . v_j / den_t + dden_t
    dm_t = -sum_S p_tj dp_tj = sum(e_t * u_t) + (q_feat_t . normalizer_t + eps) dden_t
    dz_tj = p_tj dp_tj + [j = argmax_t] dm_t   (m_t moves with its key's logit; 0 without a linear part and eps)
    dq_t = scale sum_j dz_tj k_j,  dk_j = scale sum_t dz_tj q_t,  dv_j = sum_t p_tj do_t / den_t + dstate^T k_feat_j
    dgate_t = do_t / den_t * u_t,  dq_feat_t = state_t e_t + dden_t normalizer_t
    dk_feat_j = dstate_c v_j + dnorm_c for a valid non-salient key j of chunk c, with dstate_c = sum q_feat_t e_t^T
    and dnorm_c = sum q_feat_t dden_t over the queries of chunks >= c + 2 (the ones that read chunk c linearly).

Kernels:
- states: one program per (F block, V block, batch * query head) walks the chunks in reverse and saves dstate_c and
  dnorm_c (fp32).
- query side: one program per (chunk, batch * query head) recomputes its queries' logits over the same keys as the
  forward and writes dq, dq_feat, dgate and dm_t (fp32, read by the key side).
- key side: one program per (chunk, batch * key head) holds the chunk's keys and values and, for each of the G query
  heads: the queries of this chunk and the next against all the chunk's keys; the queries of every later chunk
  against the chunk's salient keys of that head (gathered, then placed back by a one-hot matmul); the linear
  terms. dk and dv sum over the group in registers, dk_feat is per query head: no atomics.
"""

import triton
import triton.language as tl

from .attention_triton_fwd import _load_rows, _salient_keys, _valid


@triton.jit(do_not_specialize=["T", "C", "N"])
def still_bwd_states_kernel(
    q_feat,  # [B, T, H, F]
    gate,  # [B, T, H, DV]
    do,  # [B, T, H, DV]
    den,  # [B, T, H] fp32
    delta,  # [B, T, H] fp32
    key_valid,  # [B, T] uint8
    dh,  # [B, N, H, F, DV] fp32: gradient of the state key chunk n joins
    dhn,  # [B, N, H, F] fp32: gradient of its normalizer
    T,
    C,
    N,
    H: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BC: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_f, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b64 = i_b.to(tl.int64)
    o_c = tl.arange(0, BC)
    o_f = i_f * BF + tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f, m_v = o_f < F, o_v < DV
    o_state = o_f[:, None].to(tl.int64) * DV + o_v[None, :]
    first_v = tl.zeros([BF], dtype=tl.int32) == i_v  # the normalizer is stored by the first V block

    b_dS = tl.zeros([BF, BV], dtype=tl.float32)
    b_dn = tl.zeros([BF], dtype=tl.float32)
    for i_i in range(0, N):
        i_n = N - 1 - i_i
        # the queries of chunk n + 2 are the first to read chunk n linearly
        rows = (i_n + 2) * C + o_c
        m_q = (o_c < C) & (rows < T)
        q_ok = m_q & _valid(key_valid, b64, rows, T, HAS_KEY_VALID)
        b_qf = _load_rows(q_feat, b64, rows, q_ok, T, H, i_h, o_f, m_f, F)  # [BC, BF]
        b_g = _load_rows(gate, b64, rows, q_ok, T, H, i_h, o_v, m_v, DV)
        b_do = _load_rows(do, b64, rows, m_q, T, H, i_h, o_v, m_v, DV)
        row = (b64 * T + rows) * H + i_h
        b_den = tl.load(den + row, mask=m_q, other=1.0)
        b_delta = tl.load(delta + row, mask=m_q, other=0.0)
        b_dS += tl.dot(tl.trans(b_qf), b_g * b_do / b_den[:, None], input_precision=DOT_PREC)
        b_dn += tl.sum(b_qf * (-b_delta / b_den)[:, None], 0)
        base = (b64 * N + i_n) * H + i_h
        tl.store(dh + base * F * DV + o_state, b_dS, mask=m_f[:, None] & m_v[None, :])
        tl.store(dhn + base * F + o_f, b_dn, mask=m_f & first_v)


@triton.jit
def _query_rows(m_in, den_in, arg_in, delta, b64, rows, m_q, T, H: tl.constexpr, i_h):
    """Saved per-query values at token rows `rows`: max (log2), 1 / den, argmax key, -delta / den."""
    row = (b64 * T + rows) * H + i_h
    b_m = tl.load(m_in + row, mask=m_q, other=0.0)
    b_rden = 1.0 / tl.load(den_in + row, mask=m_q, other=1.0)
    b_arg = tl.load(arg_in + row, mask=m_q, other=-1)
    b_dden = -tl.load(delta + row, mask=m_q, other=0.0) * b_rden
    return b_m, b_rden, b_arg, b_dden


@triton.jit
def _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC: tl.constexpr):
    """p `[queries, keys]` and dz (gradient of the natural-log logits, the max's share included)."""
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p = tl.exp2(tl.where(vis, b_z - b_m[:, None], float("-inf")))
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC) * b_rden[:, None] + b_dden[:, None]
    b_dz = b_p * b_dp + tl.where(vis & (keys[None, :] == b_arg[:, None]), b_dm[:, None], 0.0)
    return b_p, b_dz


@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_bwd_query_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    q_feat,  # [B, T, H, F]
    gate,  # [B, T, H, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32
    h,  # [B, N, H, F, DV] fp32
    hn,  # [B, N, H, F] fp32
    do,  # [B, T, H, DV]
    m_in,  # [B, T, H] fp32
    den_in,  # [B, T, H] fp32
    arg_in,  # [B, T, H] int32
    delta,  # [B, T, H] fp32
    dq,  # [B, T, H, D]
    dq_feat,  # [B, T, H, F]
    dgate,  # [B, T, H, DV]
    dm,  # [B, T, H] fp32
    scale,
    qk_scale,
    eps,
    T,
    C,
    N,
    S,
    NS,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BC: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    BF: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_c, o_s = tl.arange(0, BC), tl.arange(0, BS)
    o_d, o_v = tl.arange(0, BD), tl.arange(0, BV)
    m_d, m_v = o_d < D, o_v < DV
    rows_q = i_n * C + o_c
    m_q = (o_c < C) & (rows_q < T)
    q_ok = m_q & _valid(key_valid, b64, rows_q, T, HAS_KEY_VALID)
    b_q = _load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)
    b_do = _load_rows(do, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)
    b_g = _load_rows(gate, b64, rows_q, q_ok, T, H, i_h, o_v, m_v, DV)
    b_m, b_rden, b_arg, b_dden = _query_rows(m_in, den_in, arg_in, delta, b64, rows_q, m_q, T, H, i_h)
    b_e = b_g * b_do * b_rden[:, None]

    # linear term, in F blocks: dq_feat now, u and q_feat . normalizer for dgate and dm
    base = (b64 * N + i_n) * H + i_h
    b_u = tl.zeros([BC, BV], dtype=tl.float32)
    b_nl = tl.zeros([BC], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_qf = _load_rows(q_feat, b64, rows_q, q_ok, T, H, i_h, o_f, m_f, F)
        b_S = tl.load(h + base * F * DV + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
        b_n = tl.load(hn + base * F + o_f, mask=m_f, other=0.0)
        b_u += tl.dot(b_qf, b_S, input_precision=DOT_PREC)
        b_nl += tl.sum(b_qf * b_n[None, :], 1)
        b_dqf = tl.dot(b_e, tl.trans(b_S), input_precision=DOT_PREC) + b_dden[:, None] * b_n[None, :]
        p_dqf = dq_feat + ((b64 * T + rows_q) * H + i_h)[:, None] * F + o_f[None, :]
        tl.store(p_dqf, tl.where(q_ok[:, None], b_dqf, 0.0).to(dq_feat.dtype.element_ty),
                 mask=m_q[:, None] & m_f[None, :])  # fmt: skip
    p_qv = ((b64 * T + rows_q) * H + i_h)[:, None] * DV + o_v[None, :]
    b_dg = tl.where(q_ok[:, None], b_do * b_rden[:, None] * b_u, 0.0)
    tl.store(dgate + p_qv, b_dg.to(dgate.dtype.element_ty), mask=m_q[:, None] & m_v[None, :])
    b_dm = tl.sum(b_e * b_u, 1) + (b_nl + eps) * b_dden
    tl.store(dm + (b64 * T + rows_q) * H + i_h, b_dm, mask=m_q)

    # softmax term over the forward's keys: the salient keys of chunks 0..n-2, then chunks n - 1 and n
    b_dq = tl.zeros([BC, BD], dtype=tl.float32)
    n_slots = tl.maximum(i_n - 1, 0) * S
    for s0 in range(0, n_slots, BS):
        keys, ok = _salient_keys(slots, b64, i_h, s0, n_slots - s0, o_s, H, NS)
        b_k = _load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)
        b_v = _load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :]
        _, b_dz = _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC)
        b_dq += tl.dot(b_dz, b_k, input_precision=DOT_PREC)
    for i_c in range(tl.maximum(i_n - 1, 0), i_n + 1):
        keys = i_c * C + o_c
        ok = (o_c < C) & _valid(key_valid, b64, keys, T, HAS_KEY_VALID)
        b_k = _load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)
        b_v = _load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :] & (keys[None, :] <= rows_q[:, None])
        _, b_dz = _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC)
        b_dq += tl.dot(b_dz, b_k, input_precision=DOT_PREC)
    p_dq = dq + ((b64 * T + rows_q) * H + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_dq, tl.where(q_ok[:, None], b_dq * scale, 0.0).to(dq.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])


@triton.jit
def _key_tile_grads(q, do, m_in, den_in, arg_in, delta, dm, key_valid, b64, i_q, C, T, i_h, o_c, o_d, m_d, o_v, m_v,
                    b_k, b_v, keys, ok, b_dk, b_dv, qk_scale, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    HAS_KEY_VALID: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Add the gradients of the queries of chunk i_q (head i_h) to the keys `keys` (`ok` those that exist), of
    which each query reads those at or before it (all of them when i_q is a later chunk)."""
    rows_q = i_q * C + o_c
    m_q = (o_c < C) & (rows_q < T)
    q_ok = m_q & _valid(key_valid, b64, rows_q, T, HAS_KEY_VALID)
    b_q = _load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)
    b_do = _load_rows(do, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)
    b_m, b_rden, b_arg, b_dden = _query_rows(m_in, den_in, arg_in, delta, b64, rows_q, m_q, T, H, i_h)
    b_dm = tl.load(dm + (b64 * T + rows_q) * H + i_h, mask=m_q, other=0.0)
    vis = m_q[:, None] & ok[None, :] & (keys[None, :] <= rows_q[:, None])
    b_p, b_dz = _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC)
    b_dk += tl.dot(tl.trans(b_dz), b_q, input_precision=DOT_PREC)
    b_dv += tl.dot(tl.trans(b_p), b_do * b_rden[:, None], input_precision=DOT_PREC)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_bwd_key_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    k_feat,  # [B, T, H, F]
    salient,  # [B, T, H] uint8
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32
    dh,  # [B, N, H, F, DV] fp32
    dhn,  # [B, N, H, F] fp32
    do,  # [B, T, H, DV]
    m_in,  # [B, T, H] fp32
    den_in,  # [B, T, H] fp32
    arg_in,  # [B, T, H] int32
    delta,  # [B, T, H] fp32
    dm,  # [B, T, H] fp32
    dk,  # [B, T, HKV, D]
    dv,  # [B, T, HKV, DV]
    dk_feat,  # [B, T, H, F]
    scale,
    qk_scale,
    T,
    C,
    N,
    S,
    NS,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BC: tl.constexpr,
    BSC: tl.constexpr,  # S padded: the salient slots of one chunk
    BD: tl.constexpr,
    BV: tl.constexpr,
    BF: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)
    o_c, o_s = tl.arange(0, BC), tl.arange(0, BSC)
    o_d, o_v = tl.arange(0, BD), tl.arange(0, BV)
    m_d, m_v = o_d < D, o_v < DV
    keys = i_n * C + o_c
    m_k = (o_c < C) & (keys < T)
    k_ok = m_k & _valid(key_valid, b64, keys, T, HAS_KEY_VALID)
    b_k = _load_rows(k, b64, keys, k_ok, T, HKV, i_hk, o_d, m_d, D)
    b_v = _load_rows(v, b64, keys, k_ok, T, HKV, i_hk, o_v, m_v, DV)
    b_dk = tl.zeros([BC, BD], dtype=tl.float32)
    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    for i_g in range(0, G):
        i_h = i_hk * G + i_g
        # queries of this chunk (causally) and of the next read every key of the chunk
        for i_q in range(i_n, tl.minimum(i_n + 2, N)):
            b_dk, b_dv = _key_tile_grads(
                q, do, m_in, den_in, arg_in, delta, dm, key_valid, b64, i_q, C, T, i_h, o_c, o_d, m_d, o_v, m_v,
                b_k, b_v, keys, k_ok, b_dk, b_dv, qk_scale, H, D, DV, HAS_KEY_VALID, DOT_PREC,
            )  # fmt: skip
        # later queries read only the chunk's salient keys of this head (none when no later chunk exists)
        s_keys, s_ok = _salient_keys(slots, b64, i_h, i_n * S, tl.where(i_n + 2 < N, S, 0), o_s, H, NS)
        b_ks = _load_rows(k, b64, s_keys, s_ok, T, HKV, i_hk, o_d, m_d, D)  # [BSC, BD]
        b_vs = _load_rows(v, b64, s_keys, s_ok, T, HKV, i_hk, o_v, m_v, DV)
        b_dks = tl.zeros([BSC, BD], dtype=tl.float32)
        b_dvs = tl.zeros([BSC, BV], dtype=tl.float32)
        for i_q in range(i_n + 2, N):
            b_dks, b_dvs = _key_tile_grads(
                q, do, m_in, den_in, arg_in, delta, dm, key_valid, b64, i_q, C, T, i_h, o_c, o_d, m_d, o_v, m_v,
                b_ks, b_vs, s_keys, s_ok, b_dks, b_dvs, qk_scale, H, D, DV, HAS_KEY_VALID, DOT_PREC,
            )  # fmt: skip
        place = (s_keys[:, None] == keys[None, :]).to(tl.float32)  # [BSC, BC]: slot -> row of the chunk
        b_dk += tl.dot(tl.trans(place), b_dks, input_precision=DOT_PREC)
        b_dv += tl.dot(tl.trans(place), b_dvs, input_precision=DOT_PREC)

        # linear term: the valid non-salient keys, read by the queries of chunks >= n + 2
        lin = k_ok & (tl.load(salient + (b64 * T + keys) * H + i_h, mask=k_ok, other=1) == 0)
        base = (b64 * N + i_n) * H + i_h
        for f0 in range(0, F, BF):
            o_f = f0 + tl.arange(0, BF)
            m_f = o_f < F
            b_dS = tl.load(dh + base * F * DV + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :],
                           other=0.0)  # fmt: skip
            b_dn = tl.load(dhn + base * F + o_f, mask=m_f, other=0.0)
            b_kf = _load_rows(k_feat, b64, keys, lin, T, H, i_h, o_f, m_f, F)  # [BC, BF]
            b_dv += tl.dot(b_kf, b_dS, input_precision=DOT_PREC)
            b_dkf = tl.dot(b_v, tl.trans(b_dS), input_precision=DOT_PREC) + b_dn[None, :]
            p_dkf = dk_feat + ((b64 * T + keys) * H + i_h)[:, None] * F + o_f[None, :]
            tl.store(p_dkf, tl.where(lin[:, None], b_dkf, 0.0).to(dk_feat.dtype.element_ty),
                     mask=m_k[:, None] & m_f[None, :])  # fmt: skip
    p_kd = ((b64 * T + keys) * HKV + i_hk)[:, None]
    tl.store(dk + p_kd * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_k[:, None] & m_d[None, :])
    tl.store(dv + p_kd * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
