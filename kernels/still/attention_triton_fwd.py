"""Fused STILL attention in Triton: the forward kernel and the helpers the backward kernels share (host code and
autograd in attention_triton, backward kernels in attention_triton_bwd).

Semantics are those of `naive_still_attention` (the package docstring). Query head h reads key head h // G,
G = H // Hkv; q_feat, k_feat, gate and the salient mask are per query head. Tiles: a chunk of C tokens is padded to
BC, a power of two >= 16 (tl.dot needs it), with masks. The salient keys of chunk n and head h are listed by token
index in `slots` `[B, H, n_old * S]` (int32, NO_KEY in unused slots; S the most any chunk and head holds,
n_old = N - 2 the chunks ever read that way), gathered from k and v in place, so K/V are never copied per query head.

The linear state a query chunk n reads, sum k_feat_j v_j^T and its normalizer sum k_feat_j over the valid
non-salient keys of chunks <= n - 2, is the state entering chunk n - 1 of the shared chunk-state recurrence
(`common.chunk_state.chunk_states` with the key mask valid & ~salient and a normalizer; zero for n <= 1), computed
by the host before this kernel.

Output kernel: one program per (chunk, batch * query head) runs the shared online softmax (`common.tiles`, log2
domain) over the slots of chunks 0..n-2 and then the keys of chunks n - 1 and n, tracking around it the first key
that attains the running max; adds the gated linear term from the state in F blocks and writes
o = (softmax numerator + gate * q_feat^T state) / (softmax sum + q_feat . normalizer + eps). For the backward it
saves per query the max m (log2 domain), the denominator and the key attaining the max: m is not shift-invariant
here (the linear terms are not scaled by e^-m), so its gradient reaches that key's logit. Every product multiplies
model-dtype operands (the probabilities and the fp32 state are cast to it) into fp32 accumulators.

Invalid positions are read as zeros, as the reference's zero_invalid does; an invalid query still attends to the
valid keys, as in the reference.
"""

import triton
import triton.language as tl

from ..common.launch import autotune, element_size
from ..common.tiles import NEG_INIT, load_rows, online_softmax, valid_rows

NO_KEY = tl.constexpr(-1)  # slot and argmax value meaning "no key"


@triton.jit
def salient_keys(slots, b64, i_h, first, count, o_s, H: tl.constexpr, NS):
    """Token indices in slots first + o_s of head i_h (NO_KEY past `count` slots), and which hold a key."""
    ok = o_s < count
    keys = tl.load(slots + (b64 * H + i_h) * NS + first + o_s, mask=ok, other=NO_KEY)
    return keys, keys != NO_KEY


@triton.jit
def state_row(b64, i_n, N, H: tl.constexpr, i_h):
    """Offset (int64, in state rows of `[B * N, H, ...]`) of the state query chunk i_n reads: the one entering chunk
    i_n - 1, which holds chunks <= i_n - 2 (the zero state entering chunk 0 for i_n <= 1)."""
    return (b64 * N + tl.maximum(i_n - 1, 0)) * H + i_h


@triton.jit
def _softmax_tile(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax, also tracking the first key that attains the running max (a tile only
    takes it over with a strictly larger max, so earlier keys win ties, as do lower keys within a tile)."""
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_max = tl.max(tl.where(vis, b_z, float("-inf")), 1)
    b_arg = tl.min(tl.where(vis & (b_z == b_max[:, None]), keys[None, :], 2147483647), 1)
    arg = tl.where(b_max > m_i, b_arg, arg)  # a row without a visible key keeps its finite m_i and its arg
    b_p, alpha, m_i, l_i = online_softmax(b_z, vis, m_i, l_i)
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_i, l_i, acc, arg


def _fwd_shared(args: dict) -> int:
    # the larger of the two loops' pipelined tiles (the keys and values of a softmax step; the fp32 state block and
    # the features of a linear step; their buffers are reused), plus the queries and probabilities as operands
    e, stages = element_size(args["q"]), args["num_stages"]
    BC, BS, BD, BV, BF = args["BC"], args["BS"], args["BD"], args["BV"], args["BF"]
    loops = max(stages * max(BS, BC) * (BD + BV) * e, stages * BF * (BV * 4 + BC * e))
    return loops + BC * BD * e + BC * max(BS, BC) * e


@autotune(
    [
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=3),
    ],
    key=["D", "DV", "F", "BC", "BS"],
    shared_estimate=_fwd_shared,
)
@triton.jit(do_not_specialize=["T", "C", "N", "S", "NS"])
def still_fwd_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    q_feat,  # [B, T, H, F]
    gate,  # [B, T, H, DV]
    key_valid,  # [B, T] uint8
    slots,  # [B, H, NS] int32: salient keys of chunks 0..N-3, S per chunk
    h,  # [B * N, H, F, DV] fp32: the state entering each chunk
    hn,  # [B * N, H, F] fp32: its normalizer
    o,  # [B, T, H, DV]
    m_out,  # [B, T, H] fp32: max logit over S_t, log2 domain (NEG_INIT without keys)
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
    q_ok = m_q & valid_rows(key_valid, b64, rows_q, T, HAS_KEY_VALID)
    b_q = load_rows(q, b64, rows_q, q_ok, T, H, i_h, o_d, m_d, D)  # [BC, BD]

    m_i = tl.full([BC], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BC], dtype=tl.float32)
    acc = tl.zeros([BC, BV], dtype=tl.float32)
    arg = tl.full([BC], NO_KEY, dtype=tl.int32)
    # the salient keys of chunks 0..n-2
    n_slots = tl.maximum(i_n - 1, 0) * S
    for s0 in range(0, n_slots, BS):
        keys, ok = salient_keys(slots, b64, i_h, s0, n_slots - s0, o_s, H, NS)
        b_k = load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)  # [BS, BD]
        b_v = load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :]
        m_i, l_i, acc, arg = _softmax_tile(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC)
    # every key of chunk n - 1, the causal keys of chunk n
    for i_c in range(tl.maximum(i_n - 1, 0), i_n + 1):
        keys = i_c * C + o_c
        ok = (o_c < C) & valid_rows(key_valid, b64, keys, T, HAS_KEY_VALID)
        b_k = load_rows(k, b64, keys, ok, T, HKV, i_hk, o_d, m_d, D)  # [BC, BD]
        b_v = load_rows(v, b64, keys, ok, T, HKV, i_hk, o_v, m_v, DV)
        vis = m_q[:, None] & ok[None, :] & (keys[None, :] <= rows_q[:, None])
        m_i, l_i, acc, arg = _softmax_tile(b_q, b_k, b_v, keys, vis, m_i, l_i, acc, arg, qk_scale, DOT_PREC)

    # the gated linear term over chunks <= n - 2, in F blocks
    p_state = state_row(b64, i_n, N, H, i_h)
    b_u = tl.zeros([BC, BV], dtype=tl.float32)  # q_feat^T state
    b_nl = tl.zeros([BC], dtype=tl.float32)  # q_feat . normalizer
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_qf = load_rows(q_feat, b64, rows_q, q_ok, T, H, i_h, o_f, m_f, F)  # [BC, BF]
        b_S = tl.load(h + p_state * F * DV + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :],
                      other=0.0)  # fmt: skip
        b_n = tl.load(hn + p_state * F + o_f, mask=m_f, other=0.0)
        b_u = tl.dot(b_qf, b_S.to(b_qf.dtype), b_u, input_precision=DOT_PREC)
        b_nl += tl.sum(b_qf.to(tl.float32) * b_n[None, :], 1)
    b_g = load_rows(gate, b64, rows_q, q_ok, T, H, i_h, o_v, m_v, DV).to(tl.float32)
    b_den = l_i + b_nl + eps
    b_o = (acc + b_g * b_u) / b_den[:, None]
    tl.store(o + ((b64 * T + rows_q) * H + i_h)[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_q[:, None] & m_v[None, :])  # fmt: skip
    if STORE_STATS:
        row = (b64 * T + rows_q) * H + i_h
        tl.store(m_out + row, m_i, mask=m_q)
        tl.store(den_out + row, b_den, mask=m_q)
        tl.store(arg_out + row, arg, mask=m_q)
