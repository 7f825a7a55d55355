"""Sliding-window softmax attention with optional sink keys in Triton (FlashAttention-2 style), forward and backward.
This is the one sliding-window online softmax of the package: Liger's window branch runs it too.

Semantics are those of `naive_sliding_window_attention`: query t sits at key position i = S - T + t and sees key j
iff i - window < j <= i and key_valid[b, j], plus the sink keys e with sink_mask[b, t, e]; a query that sees no key
outputs zeros and gets zero gradients. Query head h reads key head h // (H // Hkv); K/V are never repeated.

Tiles come from the shared helpers (common/tiles.py): rows of keys that do not exist or are padding are never read,
the window is the `band` mask, and the softmax is the online softmax in the log2 domain (scores carry log2(e) in
their scale). Dot operands are in the model dtype (q, k, v, do, and p and ds cast to it), so a half-precision model
multiplies on tensor cores; accumulators, scores and probabilities are fp32, and fp32 inputs get exact products.

Kernels:
- forward, one program per (block of BM queries, batch * query head): the sink keys (one tile), then the online
  softmax over only the key blocks the block's window can reach; saves the log2-sum-exp per query.
- dq pass, same grid: recomputes P from the saved log2-sum-exp over the sinks and the same key blocks, accumulates
  dq, and writes this query block's partial dsink_k / dsink_v (`[B, query blocks, E, H, D]` fp32, summed
  afterwards in torch), so no atomics are needed.
- dk/dv pass, one program per (block of BN keys, batch * key head): loops over the query heads of its group and
  only the query blocks whose windows reach its keys. Its tiles hold keys as rows (scores k q^T), so p and ds
  enter the dk and dv products as they are, with no transpose through shared memory.

The wrapper takes the keys and sink keys minus the mean of the valid keys (`common.centring.centre_keys`; exact,
each query's logits move by one constant), so that a large component the keys share (a k_proj bias) does not
multiply the rounding of ds in dq = ds k: the score gradients of a query sum to zero, and that sum cancels it.

Launch configurations are autotuned per head dim and dtype over a few tile shapes, with those whose shared memory
cannot fit the device pruned first; the dq pass keeps its query block at DQ_BLOCK_M, the granularity of the sink
partials the host allocates.
"""

import torch
import triton
import triton.language as tl

from ..common.centring import centre_keys
from ..common.launch import LOG2E, as_bytes, autotune, dot_precision, element_size, pow2
from ..common.tiles import (
    NEG_INIT,
    band,
    load_rows,
    log2_sum_exp,
    online_softmax,
    probabilities,
    row_offsets,
    store_rows,
    valid_rows,
)
from .reference import check_inputs

DQ_BLOCK_M = 64  # queries per program of the dq pass, whose sink partials are laid out per query block


@triton.jit
def sink_visible(sink_mask, b64, rows_q, m_q, rows_e, m_e, T, E, HAS_SINK_MASK: tl.constexpr):
    """`[queries, sinks]`: the sink keys each query sees (all existing ones without a `[B, T, E]` sink_mask)."""
    visible = m_q[:, None] & m_e[None, :]
    if HAS_SINK_MASK:
        p = sink_mask + (b64 * T + rows_q.to(tl.int64))[:, None] * E + rows_e[None, :]
        visible = visible & (tl.load(p, mask=visible, other=0) != 0)
    return visible


@triton.jit
def attend(b_q, b_k, b_v, visible, m_i, l_i, b_acc, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the forward: scores, the online softmax, and p v added to the accumulator."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p, alpha, m_i, l_i = online_softmax(b_s, visible, m_i, l_i)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
    return m_i, l_i, b_acc


@triton.jit
def score_grads(b_q, b_do, b_k, b_v, visible, b_lse, b_delta, qk_scale, DOT_PREC: tl.constexpr):
    """One `[queries, keys]` tile of the backward: p recomputed from the log2-sum-exp, and ds = p (dp - delta) with
    dp = do v^T and delta = do . o per query (the gradient of the scores, before their scale)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p = probabilities(b_s, visible, b_lse)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
    return b_p, b_p * (b_dp - b_delta[:, None])


def _fwd_shared(args: dict) -> int:
    # k and v tiles streamed per stage, the resident q and sink tiles, p converted to a dot operand
    e, BD, BM, BN = element_size(args["q"]), args["BD"], args["BM"], args["BN"]
    return args["num_stages"] * 2 * BN * BD * e + (BM + 2 * args["BE"]) * BD * e + BM * BN * 4


@autotune(
    [
        triton.Config({"BM": 64, "BN": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 64}, num_warps=8, num_stages=2),
        triton.Config({"BM": 128, "BN": 32}, num_warps=8, num_stages=2),
    ],
    key=["D"],
    shared_estimate=_fwd_shared,
)
@triton.jit(do_not_specialize=["T", "S", "window", "E"])
def window_attn_fwd_kernel(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    o,  # [B, T, H, D]
    lse,  # [B, H, T] fp32
    key_valid,  # [B, S] uint8
    sink_k,  # [B, E, HKV, D]
    sink_v,  # [B, E, HKV, D]
    sink_mask,  # [B, T, E] uint8
    qk_scale,
    T,
    S,
    window,
    E,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    rows_q = i_m * BM + tl.arange(0, BM)
    m_q = rows_q < T
    cols = tl.arange(0, BD)
    m_d = cols < D
    b_q = load_rows(q, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
    q_pos = S - T + rows_q  # key position of each query

    m_i = tl.full([BM], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    if HAS_SINKS:
        rows_e = tl.arange(0, BE)
        m_e = rows_e < E
        b_ek = load_rows(sink_k, b64, rows_e, m_e, E, HKV, i_hk, cols, m_d, D)
        b_ev = load_rows(sink_v, b64, rows_e, m_e, E, HKV, i_hk, cols, m_d, D)
        seen_e = sink_visible(sink_mask, b64, rows_q, m_q, rows_e, m_e, T, E, HAS_SINK_MASK)
        m_i, l_i, b_acc = attend(b_q, b_ek, b_ev, seen_e, m_i, l_i, b_acc, qk_scale, DOT_PREC)

    first = S - T + i_m * BM
    for n0 in range((tl.maximum(first - window + 1, 0) // BN) * BN, tl.minimum(first + BM, S), BN):
        rows_k = n0 + tl.arange(0, BN)
        ok = valid_rows(key_valid, b64, rows_k, S, HAS_KEY_VALID)
        b_k = load_rows(k, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
        b_v = load_rows(v, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
        visible = band(q_pos, rows_k, window) & ok[None, :]
        m_i, l_i, b_acc = attend(b_q, b_k, b_v, visible, m_i, l_i, b_acc, qk_scale, DOT_PREC)

    b_o = b_acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query without keys has acc == 0: o == 0
    store_rows(o, b_o, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
    tl.store(lse + (b64 * H + i_h) * T + rows_q, log2_sum_exp(m_i, l_i), mask=m_q)


def _dq_shared(args: dict) -> int:
    # k and v tiles streamed per stage, the resident q and do tiles, ds converted to a dot operand, the sink partials
    e, BD, BM, BN = element_size(args["q"]), args["BD"], args["BM"], args["BN"]
    return args["num_stages"] * 2 * BN * BD * e + 2 * BM * BD * e + BM * BN * 4 + 2 * args["BE"] * BD * 4


@autotune(
    [
        triton.Config({"BN": 32}, num_warps=8, num_stages=3),
        triton.Config({"BN": 32}, num_warps=4, num_stages=2),
        triton.Config({"BN": 16}, num_warps=4, num_stages=2),
    ],
    key=["D"],
    shared_estimate=_dq_shared,
)
@triton.jit(do_not_specialize=["T", "S", "window", "E", "NM"])
def window_attn_bwd_dq_kernel(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    do,  # [B, T, H, D]
    lse,  # [B, H, T] fp32
    delta,  # [B, H, T] fp32
    dq,  # [B, T, H, D]
    dsk,  # [B, NM, BE, H, BD] fp32: this query block's share of dsink_k
    dsv,  # [B, NM, BE, H, BD] fp32
    key_valid,  # [B, S] uint8
    sink_k,  # [B, E, HKV, D]
    sink_v,  # [B, E, HKV, D]
    sink_mask,  # [B, T, E] uint8
    scale,
    qk_scale,
    T,
    S,
    window,
    E,
    NM,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SINK_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    rows_q = i_m * BM + tl.arange(0, BM)
    m_q = rows_q < T
    cols = tl.arange(0, BD)
    m_d = cols < D
    b_q = load_rows(q, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
    b_do = load_rows(do, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
    p_l = (b64 * H + i_h) * T + rows_q
    b_lse = tl.load(lse + p_l, mask=m_q, other=0.0)
    b_delta = tl.load(delta + p_l, mask=m_q, other=0.0)
    q_pos = S - T + rows_q
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)

    if HAS_SINKS:
        # first, so the partials leave the registers before the loop
        rows_e = tl.arange(0, BE)
        m_e = rows_e < E
        b_ek = load_rows(sink_k, b64, rows_e, m_e, E, HKV, i_hk, cols, m_d, D)
        b_ev = load_rows(sink_v, b64, rows_e, m_e, E, HKV, i_hk, cols, m_d, D)
        seen_e = sink_visible(sink_mask, b64, rows_q, m_q, rows_e, m_e, T, E, HAS_SINK_MASK)
        b_pe, b_dse = score_grads(b_q, b_do, b_ek, b_ev, seen_e, b_lse, b_delta, qk_scale, DOT_PREC)
        b_dq += tl.dot(b_dse.to(b_ek.dtype), b_ek, input_precision=DOT_PREC)
        p_part = row_offsets(b64 * NM + i_m, rows_e, BE, H, i_h, BD)[:, None] + cols[None, :]  # [BE, BD]
        b_dsk = tl.dot(tl.trans(b_dse.to(b_q.dtype)), b_q, input_precision=DOT_PREC) * scale
        tl.store(dsk + p_part, b_dsk)
        b_dsv = tl.dot(tl.trans(b_pe.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
        tl.store(dsv + p_part, b_dsv)

    first = S - T + i_m * BM
    for n0 in range((tl.maximum(first - window + 1, 0) // BN) * BN, tl.minimum(first + BM, S), BN):
        rows_k = n0 + tl.arange(0, BN)
        ok = valid_rows(key_valid, b64, rows_k, S, HAS_KEY_VALID)
        b_k = load_rows(k, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
        b_v = load_rows(v, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
        visible = band(q_pos, rows_k, window) & ok[None, :]
        _, b_ds = score_grads(b_q, b_do, b_k, b_v, visible, b_lse, b_delta, qk_scale, DOT_PREC)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)
    store_rows(dq, b_dq * scale, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)


def _dkdv_shared(args: dict) -> int:
    # q and do tiles streamed per stage, the resident k and v tiles, p and ds staged as dot operands
    e, BD, BM, BN = element_size(args["q"]), args["BD"], args["BM"], args["BN"]
    return args["num_stages"] * 2 * BM * BD * e + 2 * BN * BD * e + 2 * BM * BN * 4


@autotune(
    [
        triton.Config({"BM": 32, "BN": 64}, num_warps=8, num_stages=2),
        triton.Config({"BM": 32, "BN": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=3),
    ],
    key=["D"],
    shared_estimate=_dkdv_shared,
)
@triton.jit(do_not_specialize=["T", "S", "window"])
def window_attn_bwd_dkdv_kernel(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    do,  # [B, T, H, D]
    lse,  # [B, H, T] fp32
    delta,  # [B, H, T] fp32
    dk,  # [B, S, HKV, D]
    dv,  # [B, S, HKV, D]
    key_valid,  # [B, S] uint8
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
    rows_k = i_n * BN + tl.arange(0, BN)
    ok = valid_rows(key_valid, b64, rows_k, S, HAS_KEY_VALID)
    cols = tl.arange(0, BD)
    m_d = cols < D
    b_k = load_rows(k, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
    b_v = load_rows(v, b64, rows_k, ok, S, HKV, i_hk, cols, m_d, D)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # the queries t whose window reaches these keys: j <= S - T + t < j + window
    lo = tl.maximum(i_n * BN - (S - T), 0)
    hi = tl.minimum(i_n * BN + BN - 1 - (S - T) + window, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        for m0 in range((lo // BM) * BM, hi, BM):
            rows_q = m0 + tl.arange(0, BM)
            m_q = rows_q < T
            b_q = load_rows(q, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
            b_do = load_rows(do, b64, rows_q, m_q, T, H, i_h, cols, m_d, D)
            p_l = (b64 * H + i_h) * T + rows_q
            b_lse = tl.load(lse + p_l, mask=m_q, other=0.0)
            b_delta = tl.load(delta + p_l, mask=m_q, other=0.0)
            # [keys, queries]: key j is in the window of position i iff j <= i < j + window: band(j + window - 1, i)
            visible = band(rows_k + window - 1, S - T + rows_q, window) & (ok[:, None] & m_q[None, :])
            b_s = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
            b_p = tl.exp2(tl.where(visible, b_s - b_lse[None, :], float("-inf")))
            b_dv += tl.dot(b_p.to(b_do.dtype), b_do, input_precision=DOT_PREC)
            b_dp = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
            b_ds = b_p * (b_dp - b_delta[None, :])
            b_dk += tl.dot(b_ds.to(b_q.dtype), b_q, input_precision=DOT_PREC)
    store_rows(dk, b_dk * scale, b64, rows_k, rows_k < S, S, HKV, i_hk, cols, m_d, D)
    store_rows(dv, b_dv, b64, rows_k, rows_k < S, S, HKV, i_hk, cols, m_d, D)


def _flags(key_valid, sink_k, sink_mask) -> dict:
    return {"HAS_KEY_VALID": key_valid is not None, "HAS_SINKS": sink_k is not None,
            "HAS_SINK_MASK": sink_mask is not None}  # fmt: skip


def window_attn_fwd(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale):
    """Returns o `[B, T, H, D]` (q.dtype) and the log2-sum-exp `[B, H, T]` (fp32). Inputs are contiguous, k, v and
    the sinks in q's dtype."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    E = 0 if sink_k is None else sink_k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    window_attn_fwd_kernel[lambda meta: (triton.cdiv(T, meta["BM"]), B * H)](
        q, k, v, o, lse, key_valid, sink_k, sink_v, sink_mask, scale * LOG2E, T, S, window, E,
        H=H, HKV=HKV, G=H // HKV, D=D, BD=pow2(D), BE=pow2(E), **_flags(key_valid, sink_k, sink_mask),
        DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return o, lse


def window_attn_bwd(q, k, v, o, lse, do, window, key_valid, sink_k, sink_v, sink_mask, scale):
    """Returns dq, dk, dv, dsink_k, dsink_v (the last two None without sinks), in their inputs' dtypes."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G, E = H // HKV, 0 if sink_k is None else sink_k.shape[1]
    BD, BE = pow2(D), pow2(E)
    NM = triton.cdiv(T, DQ_BLOCK_M)
    prec = dot_precision(q.dtype)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]: do . o per query
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dsk = dsv = None
    if sink_k is not None:
        dsk = torch.empty(B, NM, BE, H, BD, dtype=torch.float32, device=q.device)
        dsv = torch.empty_like(dsk)
    window_attn_bwd_dq_kernel[(NM, B * H)](
        q, k, v, do, lse, delta, dq, dsk, dsv, key_valid, sink_k, sink_v, sink_mask, scale, scale * LOG2E,
        T, S, window, E, NM,
        H=H, HKV=HKV, G=G, D=D, BD=BD, BE=BE, BM=DQ_BLOCK_M, **_flags(key_valid, sink_k, sink_mask), DOT_PREC=prec,
    )  # fmt: skip
    window_attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BN"]), B * HKV)](
        q, k, v, do, lse, delta, dk, dv, key_valid, scale, scale * LOG2E, T, S, window,
        H=H, HKV=HKV, G=G, D=D, BD=BD, HAS_KEY_VALID=key_valid is not None, DOT_PREC=prec,
    )  # fmt: skip
    dsink_k = dsink_v = None
    if sink_k is not None:
        # [B, NM, E, Hkv, G, D] summed over the query blocks and the heads of each group -> [B, E, Hkv, D]
        dsink_k, dsink_v = (x[:, :, :E, :, :D].unflatten(3, (HKV, G)).sum((1, 4)).to(sink_k.dtype) for x in (dsk, dsv))
    return dq, dk, dv, dsink_k, dsink_v


class SlidingWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale):
        q, k, v = (x.contiguous() for x in (q, k, v))
        if sink_k is not None:
            sink_k, sink_v = sink_k.contiguous(), sink_v.contiguous()
        key_valid, sink_mask = as_bytes(key_valid), as_bytes(sink_mask)
        o, lse = window_attn_fwd(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_valid, sink_k, sink_v, sink_mask)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_valid, sink_k, sink_v, sink_mask = ctx.saved_tensors
        dq, dk, dv, dsink_k, dsink_v = window_attn_bwd(
            q, k, v, o, lse, do.to(q.dtype).contiguous(), ctx.window, key_valid, sink_k, sink_v, sink_mask, ctx.scale
        )
        return dq, dk, dv, None, None, dsink_k, dsink_v, None, None


def triton_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the last `window` keys up to itself, plus optional sink keys, in Triton.

    Differentiable w.r.t. q, k, v, sink_k and sink_v.

    Args:
        q: queries `[B, T, H, D]`; they are the last T of the S key positions. k, v and the sinks are multiplied in
            q's dtype (the model's), accumulated in fp32.
        k: keys `[B, S, Hkv, D]` with S >= T, shared by H // Hkv query heads.
        v: values `[B, S, Hkv, D]`.
        window: keys visible per query, counting its own token (>= 1).
        key_valid: `[B, S]` bool, False for keys nobody may see (padding, never read); None means all valid.
        sink_k: extra keys `[B, E, Hkv, D]` outside the window (a few: one tile holds them all), or None.
        sink_v: extra values `[B, E, Hkv, D]`, given together with sink_k.
        sink_mask: `[B, T, E]` bool, which extra keys each query sees; None means all of them.
        scale: score multiplier, default D ** -0.5.

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key. Gradients come back in their inputs'
        dtypes.
    """
    check_inputs(q, k, v, window, key_valid, sink_k, sink_v, sink_mask)
    B, T, H, D = q.shape
    S = k.shape[1]
    if sink_k is not None and sink_k.shape[1] == 0:
        sink_k = sink_v = sink_mask = None
    if T == 0:
        return q.new_zeros(q.shape)
    # the keys (sinks included) minus the mean of the valid window keys, subtracted in fp32 (exact: every logit of a
    # query moves by one constant; common/centring.py): the dq pass rounds ds to the model dtype before dq = ds k
    # sums it, so keys sharing a large component (a k_proj bias) left bf16 dq 50% off
    k, sink_k = centre_keys(k, key_valid, sink_k)
    # one dtype for the matmul operands (a no-op in the usual case; autograd casts the gradients back)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if sink_k is not None:
        sink_k, sink_v = sink_k.to(q.dtype), sink_v.to(q.dtype)
    scale = D**-0.5 if scale is None else float(scale)
    window = min(int(window), S)  # no query sees more than S keys; keeps the window within int32
    if key_valid is not None:
        key_valid = key_valid.to(torch.bool)
    if sink_mask is not None:
        sink_mask = sink_mask.to(torch.bool)
    return SlidingWindowAttentionFunction.apply(q, k, v, window, key_valid, sink_k, sink_v, sink_mask, scale)
