"""Fused STILL attention in Triton: forward kernels and the helpers the backward kernels share (host code and
autograd in attention_triton, backward kernels in attention_triton_bwd).

Semantics are those of `naive_still_attention` (the package docstring). Query head h reads key head h // G,
G = H // Hkv; q_feat, k_feat, gate and `salient` are per query head. Tiles: a chunk of C tokens is padded to BC, a
power of two >= 16 (tl.dot needs it), with masks. The salient keys of chunk n and head h are listed by token index
in `slots` `[B, H, n_old * S]` (int32, -1 in unused slots; S the most any chunk and head holds, n_old = N - 2 the
chunks ever read that way), gathered from k and v in place, so K/V are never copied per query head.

Kernels:
- states: one program per (F block, V block, batch * query head) walks the chunks and saves, for each query chunk
  n, the state sum k_feat_j v_j^T and normalizer sum k_feat_j over the valid non-salient keys of chunks <= n - 2
  (fp32, `[B, N, H, F, Dv]` and `[B, N, H, F]`).
- output: one program per (chunk, batch * query head) runs an online softmax (log2 domain) over the slots of
  chunks 0..n-2 and then the keys of chunks n - 1 and n, adds the gated linear term from the state in F blocks and
  writes o = (softmax numerator + gate * q_feat^T state) / (softmax sum + q_feat . normalizer + eps). For the
  backward it saves per query the max m (log2 domain), the denominator and the key attaining the max: m is not
  shift-invariant here (the linear terms are not scaled by e^-m), so its gradient reaches that key's logit.
Invalid positions are read as zeros, as the reference's zero_invalid does; an invalid query still attends to the
valid keys, as in the reference.
"""

import triton
import triton.language as tl

NO_KEY = tl.constexpr(-1)  # slot and argmax value meaning "no key"


@triton.jit
def _load_rows(x, b64, rows, ok, T, NH: tl.constexpr, i_h, o_c, m_c, W: tl.constexpr):
    """Columns o_c (mask m_c) of head i_h at token rows `rows` `[N]` of x `[B, T, NH, W]`, as fp32 `[N, len(o_c)]`;
    zeros where not ok."""
    p = x + ((b64 * T + rows.to(tl.int64)) * NH + i_h)[:, None] * W + o_c[None, :]
    return tl.load(p, mask=ok[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _valid(key_valid, b64, rows, T, HAS_KEY_VALID: tl.constexpr):
    """Which token rows exist (0 <= row < T) and are not padding."""
    ok = (rows >= 0) & (rows < T)
    if HAS_KEY_VALID:
        ok = ok & (tl.load(key_valid + b64 * T + rows, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _salient_keys(slots, b64, i_h, first, count, o_s, H: tl.constexpr, NS):
    """Token indices in slots first + o_s of head i_h (NO_KEY past `count` slots), and which hold a key."""
    ok = o_s < count
    keys = tl.load(slots + (b64 * H + i_h) * NS + first + o_s, mask=ok, other=NO_KEY)
    return keys, keys != NO_KEY


@triton.jit
def _softmax_step(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (log2 domain), also tracking the first key that attains the max."""
    b_z = tl.where(vis, tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
    b_max = tl.max(b_z, 1)
    b_arg = tl.min(tl.where(b_z == b_max[:, None], keys[None, :], 2147483647), 1)
    arg = tl.where(b_max > m_i, b_arg, arg)  # a fully masked row keeps its finite m_i and its arg
    m_new = tl.maximum(m_i, b_max)
    b_p = tl.exp2(b_z - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p, b_v, input_precision=DOT_PREC)
    return m_new, l_i, acc, arg


@triton.jit(do_not_specialize=["T", "C", "N"])
def still_fwd_states_kernel(
    k_feat,  # [B, T, H, F]
    v,  # [B, T, HKV, DV]
    salient,  # [B, T, H] uint8
    key_valid,  # [B, T] uint8
    h,  # [B, N, H, F, DV] fp32: the state query chunk n reads
    hn,  # [B, N, H, F] fp32: its normalizer
    T,
    C,
    N,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
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
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_c = tl.arange(0, BC)
    o_f = i_f * BF + tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f, m_v = o_f < F, o_v < DV
    o_state = o_f[:, None].to(tl.int64) * DV + o_v[None, :]
    first_v = tl.zeros([BF], dtype=tl.int32) == i_v  # the normalizer is stored by the first V block

    b_S = tl.zeros([BF, BV], dtype=tl.float32)
    b_n = tl.zeros([BF], dtype=tl.float32)
    for i_n in range(0, N):
        base = (b64 * N + i_n) * H + i_h
        tl.store(h + base * F * DV + o_state, b_S, mask=m_f[:, None] & m_v[None, :])
        tl.store(hn + base * F + o_f, b_n, mask=m_f & first_v)
        # chunk n - 1 joins the state of query chunk n + 1
        rows = (i_n - 1) * C + o_c
        lin = (o_c < C) & _valid(key_valid, b64, rows, T, HAS_KEY_VALID)
        lin = lin & (tl.load(salient + (b64 * T + rows) * H + i_h, mask=lin, other=1) == 0)
        b_kf = _load_rows(k_feat, b64, rows, lin, T, H, i_h, o_f, m_f, F)  # [BC, BF]
        b_v = _load_rows(v, b64, rows, lin, T, HKV, i_hk, o_v, m_v, DV)  # [BC, BV]
        b_S += tl.dot(tl.trans(b_kf), b_v, input_precision=DOT_PREC)
        b_n += tl.sum(b_kf, 0)


@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_fwd_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    q_feat,  # [B, T, H, F]
    gate,  # [B, T, H, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32: salient keys of chunks 0..N-3, S per chunk
    h,  # [B, N, H, F, DV] fp32
    hn,  # [B, N, H, F] fp32
    o,  # [B, T, H, DV]
    m_out,  # [B, T, H] fp32: max logit over S_t, log2 domain (-1e30 without keys)
    den_out,  # [B, T, H] fp32: the denominator, eps included
    arg_out,  # [B, T, H] int32: the key attaining the max (NO_KEY without keys)
    qk_scale,  # scale * log2(e)
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
    STORE_STATS: tl.constexpr,
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
    b_q = _load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)  # [BC, BD]

    m_i = tl.full([BC], -1e30, dtype=tl.float32)  # finite: a fully masked tile leaves it unchanged, no NaN
    l_i = tl.zeros([BC], dtype=tl.float32)
    acc = tl.zeros([BC, BV], dtype=tl.float32)
    arg = tl.full([BC], NO_KEY, dtype=tl.int32)
    # the salient keys of chunks 0..n-2
    n_slots = tl.maximum(i_n - 1, 0) * S
    for s0 in range(0, n_slots, BS):
        keys, ok = _salient_keys(slots, b64, i_h, s0, n_slots - s0, o_s, H, NS)
        b_k = _load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)
        b_v = _load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :]
        m_i, l_i, acc, arg = _softmax_step(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC)
    # every key of chunk n - 1, the causal keys of chunk n
    for i_c in range(tl.maximum(i_n - 1, 0), i_n + 1):
        keys = i_c * C + o_c
        ok = (o_c < C) & _valid(key_valid, b64, keys, T, HAS_KEY_VALID)
        b_k = _load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)
        b_v = _load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :] & (keys[None, :] <= rows_q[:, None])
        m_i, l_i, acc, arg = _softmax_step(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC)

    # the gated linear term over chunks <= n - 2, in F blocks
    base = (b64 * N + i_n) * H + i_h
    b_u = tl.zeros([BC, BV], dtype=tl.float32)  # q_feat^T state
    b_nl = tl.zeros([BC], dtype=tl.float32)  # q_feat . normalizer
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_qf = _load_rows(q_feat, b64, rows_q, q_ok, T, H, i_h, o_f, m_f, F)  # [BC, BF]
        b_S = tl.load(h + base * F * DV + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
        b_n = tl.load(hn + base * F + o_f, mask=m_f, other=0.0)
        b_u += tl.dot(b_qf, b_S, input_precision=DOT_PREC)
        b_nl += tl.sum(b_qf * b_n[None, :], 1)
    b_g = _load_rows(gate, b64, rows_q, q_ok, T, H, i_h, o_v, m_v, DV)
    b_den = l_i + b_nl + eps
    b_o = (acc + b_g * b_u) / b_den[:, None]
    tl.store(o + ((b64 * T + rows_q) * H + i_h)[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_q[:, None] & m_v[None, :])  # fmt: skip
    if STORE_STATS:
        row = (b64 * T + rows_q) * H + i_h
        tl.store(m_out + row, m_i, mask=m_q)
        tl.store(den_out + row, b_den, mask=m_q)
        tl.store(arg_out + row, arg, mask=m_q)
