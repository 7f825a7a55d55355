"""The chunk-state recurrence of linear attention, written once for gated linear attention (and so Liger's linear
branch) and STILL: the state entering every chunk (forward) and the gradient of the state leaving every chunk
(backward), each walked by one program per (K block, V block, sequence * state head) while everything else runs
chunk-parallel.

With chunks of C tokens, a state S `[K, V]` (fp32) per sequence and state head, and per chunk n the cumulative
log decay b_t = g_1 + ... + g_t restarting at the chunk (`chunk_local_cumsum`; b = 0 without a gate), b_L its
value at the chunk's last token and m_s an optional key mask:
    S_{n+1} = exp(b_L) * S_n + sum_{s in n} (m_s k_s * exp(b_L - b_s)) v_s^T
    N_{n+1} = exp(b_L) * N_n + sum_{s in n} m_s k_s * exp(b_L - b_s)          (the normalizer, optional)
Every exponent is <= 0. The queries of chunk n + lag read S_n (lag 0 for GLA, whose queries read the state
entering their own chunk through q_t * exp(b_t); lag 1 for STILL, ungated, whose queries read the state entering
the previous chunk). With D_n = dL/dS_{n+1}, the gradient of the state leaving chunk n (D_{last} = dL/dS_final):
    D_{n-1} = exp(b_L(n)) * D_n + scale * sum_{heads, t in chunk n + lag} (q_t * exp(b_t)) do_t^T
and likewise for the normalizer with a per-query weight w_t in place of do_t. What remains at the start is the
initial state's gradient.

Layouts: k `[B, T, HS, K]` (HS state heads), v `[B, T, HV, V]` (state head s reads value head s // (HS // HV)),
q `[B, T, HQ, K]` (HQ / HS query heads per state head), b and the key mask per state head. States are saved as
`[total chunks, HS, K, V]`: chunk i of sequence n at row chunk_offsets[n] + i (n * NT + i without cu_seqlens).
Packed sequences (cu_seqlens `[N + 1]`, B = 1) restart the state at each boundary, from their initial state.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import as_bytes, autotune, dot_precision, element_size, pow2


class ChunkLayout(NamedTuple):
    """Where the chunks of a (possibly packed) batch lie, computed once on the host per call."""

    chunk_size: int
    NT: int  # chunks of the longest sequence (T without cu_seqlens)
    N: int  # sequences
    total_chunks: int
    cu_seqlens: torch.Tensor | None  # int64 [N + 1] on the device
    chunk_offsets: torch.Tensor | None  # int64 [N + 1]: the first chunk of each sequence among all chunks
    chunk_indices: torch.Tensor | None  # int32 [total_chunks, 2]: (sequence, chunk within it) of each chunk


def chunk_layout(B: int, T: int, chunk_size: int, cu_seqlens: torch.Tensor | None, device) -> ChunkLayout:
    """The chunks of B rows of T tokens, or of the sequences packed along T by cu_seqlens (a host sync on CUDA)."""
    NT = triton.cdiv(T, chunk_size)
    if cu_seqlens is None:
        return ChunkLayout(chunk_size, NT, B, B * NT, None, None, None)
    lengths = cu_seqlens.detach().to("cpu", torch.int64).diff()
    chunks = (lengths + chunk_size - 1) // chunk_size
    offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), chunks)
    within = torch.arange(int(offsets[-1])) - offsets[:-1][sequence]
    indices = torch.stack([sequence, within], 1).to(torch.int32)
    return ChunkLayout(
        chunk_size, int(chunks.max()) if len(chunks) else 0, len(lengths), int(offsets[-1]),
        cu_seqlens.detach().to(device=device, dtype=torch.int64).contiguous(), offsets.to(device),
        indices.to(device).contiguous(),
    )  # fmt: skip


@triton.jit
def sequence_span(i_b, cu_seqlens, chunk_offsets, T, NT, C, IS_VARLEN: tl.constexpr):
    """Sequence i_b's first row (int64), length, chunk count and first chunk among all chunks (int64)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        T_seq = (tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos).to(tl.int32)
        NT_seq = tl.cdiv(T_seq, C)
        boc = tl.load(chunk_offsets + i_b).to(tl.int64)
    else:
        bos = i_b.to(tl.int64) * T
        T_seq = T
        NT_seq = NT
        boc = i_b.to(tl.int64) * NT
    return bos, T_seq, NT_seq, boc


@triton.jit
def chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr):
    """For a chunk-parallel program i_t (over one row's chunks, or over all packed chunks with cu_seqlens): its
    sequence's first row (int64) and length, the chunk's index within the sequence and among all chunks (int64)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
        i_c = tl.load(chunk_indices + 2 * i_t + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T_seq = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        flat = i_t.to(tl.int64)
    else:
        i_c = i_t
        bos = i_b.to(tl.int64) * T
        T_seq = T
        flat = i_b.to(tl.int64) * NT + i_t
    return bos, T_seq, i_c, flat


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_cumsum_kernel(
    g,  # [B, T, H, K]
    b,  # [B, T, H, K] fp32
    cu_seqlens,
    chunk_indices,
    T,
    NT,
    C,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, T_seq, i_c, _ = chunk_position(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = i_c * C + o_t
    m_t = (o_t < C) & (rows < T_seq)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        p = ((bos + rows.to(tl.int64)) * H + i_h)[:, None] * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        tl.store(b + p, tl.cumsum(tl.load(g + p, mask=m, other=0.0).to(tl.float32), axis=0), mask=m)


def _states_shared(args: dict) -> int:
    # k, v and b tiles streamed per chunk, and the k tile again as a dot operand
    k, v = element_size(args["k"]), element_size(args["v"])
    streamed = args["BT"] * (args["BK"] * (k + 4 + k) + args["BV"] * v)
    return args["num_stages"] * streamed


def _configs(*settings: tuple[int, int, int, int]) -> list[triton.Config]:
    return [
        triton.Config({"BK": BK, "BV": BV}, num_warps=warps, num_stages=stages) for BK, BV, warps, stages in settings
    ]


# (BK, BV, warps, stages). Settings that spill on sm_80 at head dim 64/128 in bf16/fp16 are left out (`python -m
# linearize.kernels.compile_check --methods gla,liger,still --head-dims 64,128 --dtypes bf16,fp16`): 64x64 at 4
# warps in the backward; in the forward 32x32 at 4 warps and 32x64 at 3 stages.
_STATES_CONFIGS = _configs((64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 2, 2))
_STATE_GRADS_CONFIGS = _configs((64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 3), (32, 32, 2, 2))


def _states_excluded(args: dict) -> bool:
    # with a gate (the fp32 decay tile beside the state), 64x64 on 4 warps sits at the register limit: under triton
    # 3.6 it takes 251-255 registers on sm_80 and sm_90 and spills 16-32 B with an initial or final state (prefill,
    # decode), whose launches share the tuning key with training's. 8 warps hold the same tiles in 126-173 registers
    return bool(args["HAS_GATE"]) and (args["BK"], args["BV"], args["num_warps"]) == (64, 64, 4)


@autotune(_STATES_CONFIGS, key=["K", "V", "BT", "HAS_GATE"], shared_estimate=_states_shared, excluded=_states_excluded)
@triton.jit(do_not_specialize=["T", "NT", "C"])
def chunk_state_fwd_kernel(
    k,  # [B, T, HS, K]
    v,  # [B, T, HV, V]
    b,  # [B, T, HS, K] fp32: cumulative log decay within chunks
    key_mask,  # [B, T, HS] uint8
    h0,  # [N, HS, K, V]
    h,  # [total chunks, HS, K, V] fp32: the state entering each chunk
    hn,  # [total chunks, HS, K] fp32: the normalizer entering each chunk
    ht,  # [N, HS, K, V] fp32
    cu_seqlens,
    chunk_offsets,
    T,
    NT,
    C,
    HS: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_NORMALIZER: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = i_bh // HS, i_bh % HS
    i_hv = i_s // (HS // HV)
    bos, T_seq, NT_seq, boc = sequence_span(i_b, cu_seqlens, chunk_offsets, T, NT, C, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    m_n = m_k & (tl.zeros([BK], dtype=tl.int32) == i_v)  # the normalizer is stored by the first V block

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_n = tl.zeros([BK], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S += tl.load(h0 + (i_b.to(tl.int64) * HS + i_s) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, NT_seq):
        p_h = (boc + i_c) * HS + i_s
        tl.store(h + p_h * K * V + o_state, b_S, mask=m_kv)
        if STORE_NORMALIZER:
            tl.store(hn + p_h * K + o_k, b_n, mask=m_n)
        rows = i_c * C + o_t
        m_t = (o_t < C) & (rows < T_seq)
        r64 = bos + rows.to(tl.int64)
        if HAS_KEY_MASK:
            m_t = m_t & (tl.load(key_mask + r64 * HS + i_s, mask=m_t, other=0) != 0)
        p_k = (r64 * HS + i_s)[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + (r64 * HV + i_hv)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_GATE:
            last = bos + tl.minimum(i_c * C + C, T_seq) - 1
            b_bl = tl.load(b + (last * HS + i_s) * K + o_k, mask=m_k, other=0.0)
            b_b = tl.load(b + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_kd = (b_k * tl.exp(b_bl[None, :] - b_b)).to(b_v.dtype)
            b_S *= tl.exp(b_bl)[:, None]
            b_n *= tl.exp(b_bl)
        else:
            b_kd = b_k.to(b_v.dtype)
        b_S += tl.dot(tl.trans(b_kd), b_v, input_precision=DOT_PREC)
        if STORE_NORMALIZER:
            b_n += tl.sum(b_kd.to(tl.float32), 0)
    if STORE_FINAL_STATE:
        tl.store(ht + (i_b.to(tl.int64) * HS + i_s) * K * V + o_state, b_S, mask=m_kv)


def _state_grads_shared(args: dict) -> int:
    q, do = element_size(args["q"]), element_size(args["do"])
    streamed = args["BT"] * (args["BK"] * (q + 4 + q) + args["BV"] * do)
    return args["num_stages"] * streamed


@autotune(_STATE_GRADS_CONFIGS, key=["K", "V", "BT", "HAS_GATE"], shared_estimate=_state_grads_shared)
@triton.jit(do_not_specialize=["T", "NT", "C"])
def chunk_state_bwd_kernel(
    q,  # [B, T, HQ, K]
    do,  # [B, T, HQ, V]
    b,  # [B, T, HS, K] fp32
    w,  # [B, T, HQ] fp32: per-query weight of the normalizer's gradient
    dht,  # [N, HS, K, V]
    dh,  # [total chunks, HS, K, V] fp32: the gradient of the state leaving each chunk
    dhn,  # [total chunks, HS, K] fp32: the gradient of the normalizer leaving each chunk
    dh0,  # [N, HS, K, V] fp32
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    NT,
    C,
    HQ: tl.constexpr,
    HS: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LAG: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = i_bh // HS, i_bh % HS
    bos, T_seq, NT_seq, boc = sequence_span(i_b, cu_seqlens, chunk_offsets, T, NT, C, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    m_n = m_k & (tl.zeros([BK], dtype=tl.int32) == i_v)  # the normalizer's gradient is stored by the first V block

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    b_dn = tl.zeros([BK], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dS += tl.load(dht + (i_b.to(tl.int64) * HS + i_s) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_i in range(0, NT_seq):
        i_c = NT_seq - 1 - i_i
        p_h = (boc + i_c) * HS + i_s
        tl.store(dh + p_h * K * V + o_state, b_dS, mask=m_kv)
        if HAS_WEIGHT:
            tl.store(dhn + p_h * K + o_k, b_dn, mask=m_n)
        # the queries that read the state entering chunk i_c
        rows = (i_c + LAG) * C + o_t
        m_t = (o_t < C) & (rows < T_seq)
        r64 = bos + rows.to(tl.int64)
        if HAS_GATE:
            last = bos + tl.minimum(i_c * C + C, T_seq) - 1
            b_bl = tl.load(b + (last * HS + i_s) * K + o_k, mask=m_k, other=0.0)
            b_qdec = tl.exp(tl.load(b + (r64 * HS + i_s)[:, None] * K + o_k[None, :],
                                    mask=m_t[:, None] & m_k[None, :], other=0.0))  # fmt: skip
            b_dS *= tl.exp(b_bl)[:, None]
            b_dn *= tl.exp(b_bl)
        for i_g in range(0, HQ // HS):
            i_q = i_s * (HQ // HS) + i_g
            b_q = tl.load(q + (r64 * HQ + i_q)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0)  # fmt: skip
            b_do = tl.load(do + (r64 * HQ + i_q)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                           other=0.0)  # fmt: skip
            if HAS_GATE:
                b_q = b_q * b_qdec
            b_dS += tl.dot(tl.trans(b_q.to(b_do.dtype)), b_do, input_precision=DOT_PREC) * scale
            if HAS_WEIGHT:
                b_w = tl.load(w + r64 * HQ + i_q, mask=m_t, other=0.0)
                b_dn += tl.sum(b_q.to(tl.float32) * b_w[:, None], 0)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + (i_b.to(tl.int64) * HS + i_s) * K * V + o_state, b_dS, mask=m_kv)


def chunk_local_cumsum(g: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """b `[B, T, H, K]` fp32: the cumulative sum of g along T, restarting at every chunk (of every sequence)."""
    B, T, H, K = g.shape
    b = torch.empty(B, T, H, K, dtype=torch.float32, device=g.device)
    varlen = layout.cu_seqlens is not None
    chunk_cumsum_kernel[(layout.total_chunks, H) if varlen else (layout.NT, B * H)](
        g, b, layout.cu_seqlens, layout.chunk_indices, T, layout.NT, layout.chunk_size,
        H=H, K=K, BT=pow2(layout.chunk_size), BK=min(64, pow2(K)), IS_VARLEN=varlen,
    )  # fmt: skip
    return b


def chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor | None,
    layout: ChunkLayout,
    *,
    key_mask: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    normalizer: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The state entering every chunk `[total chunks, HS, K, V]` (fp32), the normalizer entering every chunk
    `[total chunks, HS, K]` (or None) and the final state `[N, HS, K, V]` (or None).

    Args:
        k: keys `[B, T, HS, K]`, in the model dtype.
        v: values `[B, T, HV, V]`; HS must be a multiple of HV.
        b: `chunk_local_cumsum` of the log decay `[B, T, HS, K]`, or None for no decay.
        layout: `chunk_layout` of the batch.
        key_mask: `[B, T, HS]` bool, the keys that enter the state (padding and STILL's salient keys do not).
        initial_state: `[N, HS, K, V]` state before the first chunk, or None for zeros.
    """
    B, T, HS, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dev = k.device
    h = torch.empty(layout.total_chunks, HS, K, V, dtype=torch.float32, device=dev)
    hn = torch.empty(layout.total_chunks, HS, K, dtype=torch.float32, device=dev) if normalizer else None
    ht = torch.empty(layout.N, HS, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    key_mask = as_bytes(key_mask)
    chunk_state_fwd_kernel[lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), layout.N * HS)](
        k, v, b, key_mask, initial_state, h, hn, ht, layout.cu_seqlens, layout.chunk_offsets,
        T, layout.NT, layout.chunk_size,
        HS=HS, HV=HV, K=K, V=V, BT=pow2(layout.chunk_size),
        HAS_GATE=b is not None, HAS_KEY_MASK=key_mask is not None, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, STORE_NORMALIZER=normalizer,
        IS_VARLEN=layout.cu_seqlens is not None, DOT_PREC=dot_precision(v.dtype),
    )  # fmt: skip
    return h, hn, ht


def chunk_state_grads(
    q: torch.Tensor,
    do: torch.Tensor,
    b: torch.Tensor | None,
    layout: ChunkLayout,
    *,
    state_heads: int,
    scale: float = 1.0,
    lag: int = 0,
    query_weight: torch.Tensor | None = None,
    final_state_grad: torch.Tensor | None = None,
    initial_state_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradient of the state leaving every chunk `[total chunks, HS, K, V]` (fp32), of the normalizer leaving
    every chunk `[total chunks, HS, K]` (with `query_weight`, else None) and of the initial state `[N, HS, K, V]`
    (or None).

    Args:
        q: the queries that read the states `[B, T, HQ, K]` (HQ a multiple of state_heads), in the model dtype.
        do: the gradient of what they read, `[B, T, HQ, V]`: the state's output is scale * (q_t * exp(b_t))^T S.
        b: `chunk_local_cumsum` of the log decay `[B, T, HS, K]`, or None for no decay (the only choice with lag > 0).
        layout: `chunk_layout` of the batch.
        state_heads: HS.
        lag: the queries of chunk n + lag read the state entering chunk n (lag > 0 only without decay).
        query_weight: `[B, T, HQ]` fp32, each query's weight in the normalizer's output q_t . N.
        final_state_grad: `[N, HS, K, V]`, or None.
    """
    if lag and b is not None:
        raise ValueError("a lagged read of the state has no decay")
    B, T, HQ, K = q.shape
    V = do.shape[3]
    HS = state_heads
    dev = q.device
    dh = torch.empty(layout.total_chunks, HS, K, V, dtype=torch.float32, device=dev)
    dhn = torch.empty(layout.total_chunks, HS, K, dtype=torch.float32, device=dev) if query_weight is not None else None
    dh0 = torch.empty(layout.N, HS, K, V, dtype=torch.float32, device=dev) if initial_state_grad else None
    chunk_state_bwd_kernel[lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), layout.N * HS)](
        q, do, b, query_weight, final_state_grad, dh, dhn, dh0, layout.cu_seqlens, layout.chunk_offsets,
        float(scale), T, layout.NT, layout.chunk_size,
        HQ=HQ, HS=HS, K=K, V=V, BT=pow2(layout.chunk_size), LAG=lag,
        HAS_GATE=b is not None, HAS_WEIGHT=query_weight is not None,
        USE_FINAL_STATE_GRADIENT=final_state_grad is not None, STORE_INITIAL_STATE_GRADIENT=initial_state_grad,
        IS_VARLEN=layout.cu_seqlens is not None, DOT_PREC=dot_precision(do.dtype),
    )  # fmt: skip
    return dh, dhn, dh0
