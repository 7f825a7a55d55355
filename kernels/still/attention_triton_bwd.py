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
dstate_c and dnorm_c are the gradients of the state and normalizer leaving chunk c in the shared chunk-state
recurrence read with lag 1 (`common.chunk_state.chunk_state_grads`: e_t is the "do" of the state read, dden_t the
weight of the normalizer read), run by the host after the query-side kernel.

Kernels, in order:
- query side: one program per (chunk, batch * query head) computes delta, e and dden (writing e in the model dtype
  and dden for the state gradients and the key side, both 0 at invalid queries, whose q and q_feat are zeros), the
  linear term's dq_feat, dgate and dm_t (fp32, read by the key side), then recomputes its queries' logits over the
  same keys as the forward for dq.
- (the shared recurrence: dstate_c and dnorm_c)
- salient: one program per (chunk older than the last two, batch * query head) holds the chunk's salient keys of
  that head and streams the queries of every chunk two or more later: their dk and dv per slot (fp32 scratch).
- linear: one program per (chunk, batch * key head) gives dk_feat per query head and dv through the state, summed
  over the group (fp32 scratch).
- key side: one program per (chunk, batch * key head) holds the chunk's keys and values and streams, for each of
  the G query heads, the queries of this chunk and the next; it adds each salient row's slot gradients and the
  linear dv. Everything sums over the group in registers or per program: no atomics.
Every product multiplies model-dtype operands (probabilities, their gradients and the fp32 states cast to it) into
fp32 accumulators.
"""

import triton
import triton.language as tl

from ..common.launch import autotune, element_size
from ..common.tiles import load_rows, probabilities, store_rows, valid_rows
from .attention_triton_fwd import salient_keys, state_row


@triton.jit
def _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC: tl.constexpr):
    """dz `[queries, keys]` (fp32): the gradient of the natural-log logits, the max's share included."""
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p = probabilities(b_z, vis, b_m)  # m in place of a log-sum-exp: p is not normalised here
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC) * b_rden[:, None] + b_dden[:, None]
    return b_p * b_dp + tl.where(vis & (keys[None, :] == b_arg[:, None]), b_dm[:, None], 0.0)


def _query_shared(args: dict) -> int:
    # the larger of the two loops' pipelined tiles (the state block and its transpose in fp32 and the features of a
    # linear step; the keys and values of a softmax step; their buffers are reused), plus q, do and dz as operands
    e, stages = element_size(args["q"]), args["num_stages"]
    BC, BS, BD, BV, BF = args["BC"], args["BS"], args["BD"], args["BV"], args["BF"]
    loops = max(stages * BF * (2 * BV * 4 + BC * e), stages * max(BS, BC) * (BD + BV) * e)
    return loops + BC * (BD + BV) * e + BC * max(BS, BC) * e


@autotune(
    [
        triton.Config({"BF": 32}, num_warps=8, num_stages=2),
        triton.Config({"BF": 32}, num_warps=8, num_stages=3),
        triton.Config({"BF": 64}, num_warps=8, num_stages=2),
    ],
    key=["D", "DV", "F", "BC", "BS"],
    shared_estimate=_query_shared,
)
@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_bwd_query_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    q_feat,  # [B, T, H, F]
    gate,  # [B, T, H, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32
    h,  # [B * N, H, F, DV] fp32
    hn,  # [B * N, H, F] fp32
    o,  # [B, T, H, DV]
    do,  # [B, T, H, DV]
    m_in,  # [B, T, H] fp32
    den_in,  # [B, T, H] fp32
    arg_in,  # [B, T, H] int32
    dq,  # [B, T, H, D]
    dq_feat,  # [B, T, H, F]
    dgate,  # [B, T, H, DV]
    e_out,  # [B, T, H, DV]: e (model dtype)
    dden_out,  # [B, T, H] fp32: dden
    dm_out,  # [B, T, H] fp32: dm
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
    BF: tl.constexpr,  # features per step
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
    q_ok = m_q & valid_rows(key_valid, b64, rows_q, T, HAS_KEY_VALID)
    row = (b64 * T + rows_q) * H + i_h
    b_do = load_rows(do, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)  # [BC, BV]
    b_rden = 1.0 / tl.load(den_in + row, mask=m_q, other=1.0)
    b_delta = tl.sum(b_do.to(tl.float32) * load_rows(o, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV).to(tl.float32), 1)
    b_dden = tl.where(q_ok, -b_delta * b_rden, 0.0)
    b_g = load_rows(gate, b64, rows_q, q_ok, T, H, i_h, o_v, m_v, DV)
    b_e = (b_g.to(tl.float32) * b_do.to(tl.float32) * b_rden[:, None]).to(b_do.dtype)
    store_rows(e_out, b_e, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)
    tl.store(dden_out + row, b_dden, mask=m_q)

    # linear term, in F blocks: dq_feat now, u and q_feat . normalizer for dgate and dm
    p_state = state_row(b64, i_n, N, H, i_h)
    b_u = tl.zeros([BC, BV], dtype=tl.float32)
    b_nl = tl.zeros([BC], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_qf = load_rows(q_feat, b64, rows_q, q_ok, T, H, i_h, o_f, m_f, F)  # [BC, BF]
        b_S = tl.load(h + p_state * F * DV + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :],
                      other=0.0).to(b_qf.dtype)  # fmt: skip
        # S^T read again (from cache) rather than transposed in registers, which spills on sm_80
        b_St = tl.load(h + p_state * F * DV + o_f[None, :] * DV + o_v[:, None], mask=m_f[None, :] & m_v[:, None],
                       other=0.0).to(b_qf.dtype)  # fmt: skip
        b_n = tl.load(hn + p_state * F + o_f, mask=m_f, other=0.0)
        b_u = tl.dot(b_qf, b_S, b_u, input_precision=DOT_PREC)
        b_nl += tl.sum(b_qf.to(tl.float32) * b_n[None, :], 1)
        b_dqf = tl.dot(b_e, b_St, input_precision=DOT_PREC) + b_dden[:, None] * b_n[None, :]
        store_rows(dq_feat, b_dqf, b64, rows_q, m_q, T, H, i_h, o_f, m_f, F)
    b_dg = tl.where(q_ok[:, None], b_do.to(tl.float32) * b_rden[:, None] * b_u, 0.0)
    store_rows(dgate, b_dg, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)
    b_dm = tl.sum(b_e.to(tl.float32) * b_u, 1) + (b_nl + eps) * b_dden
    tl.store(dm_out + row, b_dm, mask=m_q)

    # softmax term over the forward's keys: the salient keys of chunks 0..n-2, then chunks n - 1 and n
    b_q = load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)  # [BC, BD]
    b_m = tl.load(m_in + row, mask=m_q, other=0.0)
    b_arg = tl.load(arg_in + row, mask=m_q, other=-1)
    b_dq = tl.zeros([BC, BD], dtype=tl.float32)
    n_slots = tl.maximum(i_n - 1, 0) * S
    for s0 in range(0, n_slots, BS):
        keys, ok = salient_keys(slots, b64, i_h, s0, n_slots - s0, o_s, H, NS)
        b_k = load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)  # [BS, BD]
        b_v = load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :]
        b_dz = _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC)
        b_dq = tl.dot(b_dz.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PREC)
    for i_c in range(tl.maximum(i_n - 1, 0), i_n + 1):
        keys = i_c * C + o_c
        ok = (o_c < C) & valid_rows(key_valid, b64, keys, T, HAS_KEY_VALID)
        b_k = load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)  # [BC, BD]
        b_v = load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :] & (keys[None, :] <= rows_q[:, None])
        b_dz = _logit_grads(b_q, b_k, b_do, b_v, keys, vis, b_m, b_rden, b_arg, b_dden, b_dm, qk_scale, DOT_PREC)
        b_dq = tl.dot(b_dz.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PREC)
    store_rows(dq, tl.where(q_ok[:, None], b_dq * scale, 0.0), b64, rows_q, m_q, T, H, i_h, o_d, m_d, D)


@triton.jit
def _key_grads(q, do, m_in, den_in, arg_in, dden_in, dm_in, key_valid, b64, rows_q, m_q, T, i_h, o_d, m_d, o_v, m_v,
               b_k, b_v, keys, ok, b_dk, b_dv, qk_scale, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               HAS_KEY_VALID: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Add the gradients of the queries at `rows_q` (`m_q` those that exist; head i_h) to the keys `keys` (`ok`
    those that exist), each query reading those at or before it. Computed transposed, `[keys, queries]`, so that
    p^T and dz^T are the A operands of dv and dk as they come."""
    q_ok = m_q & valid_rows(key_valid, b64, rows_q, T, HAS_KEY_VALID)
    b_q = load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)  # [BM, BD]
    b_do = load_rows(do, b64, rows_q, m_q, T, H, i_h, o_v, m_v, DV)
    row = (b64 * T + rows_q) * H + i_h
    b_m = tl.load(m_in + row, mask=m_q, other=0.0)
    b_rden = 1.0 / tl.load(den_in + row, mask=m_q, other=1.0)
    b_arg = tl.load(arg_in + row, mask=m_q, other=-1)
    b_dden = tl.load(dden_in + row, mask=m_q, other=0.0)
    b_dm = tl.load(dm_in + row, mask=m_q, other=0.0)
    vis = ok[:, None] & m_q[None, :] & (keys[:, None] <= rows_q[None, :])  # [BK, BM]
    b_zt = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale
    b_pt = tl.exp2(tl.where(vis, b_zt - b_m[None, :], float("-inf")))  # `probabilities`, transposed
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC) * b_rden[None, :] + b_dden[None, :]
    b_dzt = b_pt * b_dpt + tl.where(vis & (keys[:, None] == b_arg[None, :]), b_dm[None, :], 0.0)
    b_dk = tl.dot(b_dzt.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PREC)
    b_dv = tl.dot((b_pt * b_rden[None, :]).to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
    return b_dk, b_dv


def _salient_shared(args: dict) -> int:
    # the salient keys and values held, query and output-gradient tiles streamed per stage, the probabilities and
    # logit gradients as operands
    e = element_size(args["q"])
    BM, BSC, BD, BV = args["BM"], args["BSC"], args["BD"], args["BV"]
    return BSC * (BD + BV) * e + args["num_stages"] * BM * (BD + BV) * e + 2 * BM * BSC * e


@autotune(
    [
        triton.Config({"BM": 32}, num_warps=4, num_stages=2),
        triton.Config({"BM": 64}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128}, num_warps=8, num_stages=2),
    ],
    key=["D", "DV", "BSC"],
    shared_estimate=_salient_shared,
)
@triton.jit(do_not_specialize=["T", "C", "S", "NS"])
def still_bwd_salient_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32
    do,  # [B, T, H, DV]
    m_in,  # [B, T, H] fp32
    den_in,  # [B, T, H] fp32
    arg_in,  # [B, T, H] int32
    dden_in,  # [B, T, H] fp32
    dm_in,  # [B, T, H] fp32
    dks,  # [B, H, NS, D] fp32: dk of each salient slot from the queries two or more chunks later, unscaled
    dvs,  # [B, H, NS, DV] fp32: likewise dv
    qk_scale,
    T,
    C,
    S,
    NS,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BSC: tl.constexpr,  # S padded: the salient slots of one chunk
    BM: tl.constexpr,  # queries per step
    BD: tl.constexpr,
    BV: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_s, o_m = tl.arange(0, BSC), tl.arange(0, BM)
    o_d, o_v = tl.arange(0, BD), tl.arange(0, BV)
    m_d, m_v = o_d < D, o_v < DV
    s_keys, s_ok = salient_keys(slots, b64, i_h, i_n * S, S, o_s, H, NS)
    b_ks = load_rows(k, b64, s_keys, s_ok, T, HKV, i_hk, o_d, m_d, D)  # [BSC, BD]
    b_vs = load_rows(v, b64, s_keys, s_ok, T, HKV, i_hk, o_v, m_v, DV)
    b_dks = tl.zeros([BSC, BD], dtype=tl.float32)
    b_dvs = tl.zeros([BSC, BV], dtype=tl.float32)
    for r0 in range((i_n + 2) * C, T, BM):
        rows_q = r0 + o_m
        b_dks, b_dvs = _key_grads(
            q, do, m_in, den_in, arg_in, dden_in, dm_in, key_valid, b64, rows_q, rows_q < T, T, i_h, o_d, m_d, o_v,
            m_v, b_ks, b_vs, s_keys, s_ok, b_dks, b_dvs, qk_scale, H, D, DV, HAS_KEY_VALID, DOT_PREC,
        )  # fmt: skip
    p_s = (b64 * H + i_h) * NS + i_n * S + o_s
    m_s = o_s < S
    tl.store(dks + p_s[:, None] * D + o_d[None, :], b_dks, mask=m_s[:, None] & m_d[None, :])
    tl.store(dvs + p_s[:, None] * DV + o_v[None, :], b_dvs, mask=m_s[:, None] & m_v[None, :])


def _linear_shared(args: dict) -> int:
    # the chunk's values held, the fp32 state-gradient block and the features streamed per stage, the block and its
    # transpose cast as operands
    e = element_size(args["v"])
    BC, BV, BF = args["BC"], args["BV"], args["BF"]
    return BC * BV * e + args["num_stages"] * BF * (BV * 4 + BC * e) + 2 * BF * BV * e


@autotune(
    [
        triton.Config({"BF": 32}, num_warps=4, num_stages=2),
        triton.Config({"BF": 32}, num_warps=8, num_stages=2),
        triton.Config({"BF": 64}, num_warps=8, num_stages=2),
    ],
    key=["DV", "F", "BC"],
    shared_estimate=_linear_shared,
)
@triton.jit(do_not_specialize=["T", "C", "N"])
def still_bwd_linear_kernel(
    v,  # [B, T, HKV, DV]
    k_feat,  # [B, T, H, F]
    linear,  # [B, T, H] uint8: the keys that enter the linear state (valid, not salient)
    key_valid,  # [B, T] uint8
    dh,  # [B * N, H, F, DV] fp32: gradient of the state leaving each chunk
    dhn,  # [B * N, H, F] fp32: gradient of its normalizer
    dk_feat,  # [B, T, H, F]
    dv_lin,  # [B, T, HKV, DV] fp32: dv through the linear state
    T,
    C,
    N,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    DV: tl.constexpr,
    F: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    BF: tl.constexpr,  # features per step
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)
    o_c, o_v = tl.arange(0, BC), tl.arange(0, BV)
    m_v = o_v < DV
    keys = i_n * C + o_c
    m_k = (o_c < C) & (keys < T)
    k_ok = m_k & valid_rows(key_valid, b64, keys, T, HAS_KEY_VALID)
    b_v = load_rows(v, b64, keys, k_ok, T, HKV, i_hk, o_v, m_v, DV)  # [BC, BV]
    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    for i_g in range(0, G):
        i_h = i_hk * G + i_g
        lin = k_ok & (tl.load(linear + (b64 * T + keys) * H + i_h, mask=k_ok, other=0) != 0)
        p_state = (b64 * N + i_n) * H + i_h
        for f0 in range(0, F, BF):
            o_f = f0 + tl.arange(0, BF)
            m_f = o_f < F
            b_dS = tl.load(dh + p_state * F * DV + o_f[:, None] * DV + o_v[None, :],
                           mask=m_f[:, None] & m_v[None, :], other=0.0).to(b_v.dtype)  # fmt: skip
            b_dn = tl.load(dhn + p_state * F + o_f, mask=m_f, other=0.0)
            b_kf = load_rows(k_feat, b64, keys, lin, T, H, i_h, o_f, m_f, F)  # [BC, BF]
            b_dv = tl.dot(b_kf, b_dS, b_dv, input_precision=DOT_PREC)
            # dS^T read again (from cache) rather than transposed in registers, which spills on sm_80
            b_dSt = tl.load(dh + p_state * F * DV + o_f[None, :] * DV + o_v[:, None],
                            mask=m_f[None, :] & m_v[:, None], other=0.0).to(b_v.dtype)  # fmt: skip
            b_dkf = tl.dot(b_v, b_dSt, input_precision=DOT_PREC) + b_dn[None, :]
            store_rows(dk_feat, tl.where(lin[:, None], b_dkf, 0.0), b64, keys, m_k, T, H, i_h, o_f, m_f, F)
    store_rows(dv_lin, b_dv, b64, keys, m_k, T, HKV, i_hk, o_v, m_v, DV)


def _key_shared(args: dict) -> int:
    # the chunk's keys and values held, query and output-gradient tiles streamed per stage, the probabilities and
    # logit gradients as operands
    e = element_size(args["q"])
    BC, BM, BD, BV = args["BC"], args["BM"], args["BD"], args["BV"]
    return BC * (BD + BV) * e + args["num_stages"] * BM * (BD + BV) * e + 2 * BC * BM * e


@autotune(
    [
        triton.Config({"BM": 32}, num_warps=8, num_stages=2),
        triton.Config({"BM": 64}, num_warps=8, num_stages=2),
        triton.Config({"BM": 32}, num_warps=8, num_stages=3),
    ],
    key=["D", "DV", "BC", "BSC"],
    shared_estimate=_key_shared,
)
@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_bwd_key_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32
    dks,  # [B, H, NS, D] fp32
    dvs,  # [B, H, NS, DV] fp32
    dv_lin,  # [B, T, HKV, DV] fp32
    do,  # [B, T, H, DV]
    m_in,  # [B, T, H] fp32
    den_in,  # [B, T, H] fp32
    arg_in,  # [B, T, H] int32
    dden_in,  # [B, T, H] fp32
    dm_in,  # [B, T, H] fp32
    dk,  # [B, T, HKV, D]
    dv,  # [B, T, HKV, DV]
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
    BC: tl.constexpr,
    BSC: tl.constexpr,
    BM: tl.constexpr,  # queries per step
    BD: tl.constexpr,
    BV: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b64 = i_b.to(tl.int64)
    o_c, o_s, o_m = tl.arange(0, BC), tl.arange(0, BSC), tl.arange(0, BM)
    o_d, o_v = tl.arange(0, BD), tl.arange(0, BV)
    m_d, m_v = o_d < D, o_v < DV
    keys = i_n * C + o_c
    m_k = (o_c < C) & (keys < T)
    k_ok = m_k & valid_rows(key_valid, b64, keys, T, HAS_KEY_VALID)
    b_k = load_rows(k, b64, keys, k_ok, T, HKV, i_hk, o_d, m_d, D)  # [BC, BD]
    b_v = load_rows(v, b64, keys, k_ok, T, HKV, i_hk, o_v, m_v, DV)
    b_dk = tl.zeros([BC, BD], dtype=tl.float32)
    b_dv = load_rows(dv_lin, b64, keys, m_k, T, HKV, i_hk, o_v, m_v, DV)  # [BC, BV]: the linear part's
    recent_end = tl.minimum(i_n * C + 2 * C, T)
    for i_g in range(0, G):
        i_h = i_hk * G + i_g
        # the queries of this chunk (causally) and of the next read every key of the chunk
        for r0 in range(i_n * C, recent_end, BM):
            rows_q = r0 + o_m
            b_dk, b_dv = _key_grads(
                q, do, m_in, den_in, arg_in, dden_in, dm_in, key_valid, b64, rows_q, rows_q < recent_end, T, i_h,
                o_d, m_d, o_v, m_v, b_k, b_v, keys, k_ok, b_dk, b_dv, qk_scale, H, D, DV, HAS_KEY_VALID, DOT_PREC,
            )  # fmt: skip
        # later queries read the chunk's salient keys of this head (none when no later chunk exists): each row
        # held in a slot takes that slot's gradients (still_bwd_salient_kernel's), read back by row
        if i_n + 2 < N:
            s_keys, s_ok = salient_keys(slots, b64, i_h, i_n * S, S, o_s, H, NS)
            held = s_ok[:, None] & (s_keys[:, None] == keys[None, :])  # [BSC, BC]
            slot = tl.sum(tl.where(held, o_s[:, None], 0), 0)  # [BC]
            has_slot = tl.max(held.to(tl.int32), 0) != 0
            p_s = ((b64 * H + i_h) * NS + i_n * S + slot)[:, None]
            b_dk += tl.load(dks + p_s * D + o_d[None, :], mask=has_slot[:, None] & m_d[None, :], other=0.0)
            b_dv += tl.load(dvs + p_s * DV + o_v[None, :], mask=has_slot[:, None] & m_v[None, :], other=0.0)
    store_rows(dk, b_dk * scale, b64, keys, m_k, T, HKV, i_hk, o_d, m_d, D)
    store_rows(dv, b_dv, b64, keys, m_k, T, HKV, i_hk, o_v, m_v, DV)
