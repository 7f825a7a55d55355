"""Chunked gated linear attention in Triton: forward and backward kernels.

Semantics are those of `naive_recurrent_gla`:
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale S_t^T q_t,
with q `[B, T, H, K]`, k and g `[B, T, Hkv, K]`, v `[B, T, Hkv, V]`; query head h reads key head h // (H // Hkv).

Chunks of C = 16 tokens. Inside chunk n, b_t = g_1 + ... + g_t (cumulative log decay restarting at the chunk),
b_L its value at the chunk's last token, S the state entering the chunk:
    o_t    = scale [(q_t * exp(b_t)) S + sum_{s <= t} (sum_k q_tk k_sk exp(b_tk - b_sk)) v_s]
    S_next = exp(b_L) * S + sum_s (k_s * exp(b_L - b_s)) v_s^T
Every exponent is <= 0: exp(b_t - b_s) is evaluated pairwise on a [C, C, K] tile with future pairs masked to -inf
before the exp, never as exp(b_t) exp(-b_s).

Forward: one program per (batch, key head, V block) walks the chunks in order with S [K, BV] in fp32 registers; the
G query heads of the key head are handled in the same program, so the state is computed once per key head. The
state entering every chunk is saved for the backward.

Backward: one program per (batch, key head, V block) walks the chunks in reverse carrying dS (the gradient of the
state leaving the chunk, initialised with dht) and reloading the saved S. dv and dh0 are exact per V block; dq, dk
and dg are sums over V, so each V block writes a partial that the host adds up.

The decay gradient uses no "q dq - k dk" identity, whose O(1) terms cancel (e.g. the diagonal pair, or ht dht
against the last key's dk) and leave only rounding noise for strongly decayed tokens. Since g_r only scales the
interactions whose source precedes r and whose target is at or after r, dg_r is the sum of exactly those:
    dg_r = sum_{t >= r} q_t exp(b_t) (S do_t)                        (state entering the chunk -> chunk's queries)
         + sum_v exp(b_L) S dS_next                                   (state entering -> state leaving)
         + sum_{s < r} k_s exp(b_L - b_s) (dS_next v_s)               (chunk's keys -> state leaving)
         + sum_{s < r <= t} q_t k_s exp(b_t - b_s) (scale do_t . v_s)  (chunk's keys -> chunk's queries)
(elementwise in k; the first term carries the scale, and the sums over t run over the G query heads too).

Packed batches (cu_seqlens `[N + 1]`, B = 1): the "batch" index of a program is the sequence n, whose tokens are the
rows [cu_seqlens[n], cu_seqlens[n + 1]) (int64 offsets) and whose states are n's rows of h0, ht, dht and dh0
`[N, Hkv, K, V]`. The saved chunk states are `[total chunks, Hkv, K, V]`: sequence n's chunks start at row
chunk_offsets[n], computed on the host from cu_seqlens (without cu_seqlens, n * NT).
"""

import torch
import triton
import triton.language as tl

from ..backend import dot_precision
from .reference import check_inputs

CHUNK = 16


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_gla_fwd_kernel_o(
    q,
    k,
    v,
    g,
    o,
    h0,
    ht,
    h,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    # this program's sequence: rows [bos, bos + T_seq) of the flattened tokens, its saved states from chunk boc
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

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # [K, BV] offsets inside one state
    o_state = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    state_base = i_bh.to(tl.int64) * K * V

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S += tl.load(h0 + state_base + o_state, mask=m_kv, other=0.0).to(tl.float32)

    # [C, C] causal mask (s <= t) and selector of the chunk's last row
    causal = o_c[:, None] >= o_c[None, :]
    is_last = o_c == C - 1

    for i_n in range(0, NT_seq):
        o_t = i_n * C + o_c
        m_t = o_t < T_seq
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row_kv = bos + o_t  # int64 [C]

        if SAVE_STATES:
            p_h = h + ((boc + i_n) * HKV + i_hk) * K * V + o_state
            tl.store(p_h, b_S, mask=m_kv)

        p_k = k + (row_kv[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_g = g + (row_kv[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_v = v + (row_kv[:, None] * HKV + i_hk) * V + o_v[None, :]
        b_k = tl.load(p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(p_g, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_tv, other=0.0).to(tl.float32)

        # padded rows have g = 0, so b at the last row equals b at the last valid token
        b_b = tl.cumsum(b_g, axis=0)
        b_bl = tl.sum(tl.where(is_last[:, None], b_b, 0.0), axis=0)  # [BK]
        # [C, C, BK]: exp(b_t - b_s) for s <= t, 0 for future pairs
        b_diff = b_b[:, None, :] - b_b[None, :, :]
        b_decay = tl.exp(tl.where(causal[:, :, None], b_diff, float("-inf")))
        b_kdec = b_k[None, :, :] * b_decay
        b_qdec = tl.exp(b_b)  # [C, BK], <= 1

        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            p_q = q + ((bos + o_t)[:, None] * H + i_h) * K + o_k[None, :]
            b_q = tl.load(p_q, mask=m_tk, other=0.0).to(tl.float32)
            b_A = tl.sum(b_q[:, None, :] * b_kdec, axis=2)  # [C, C]
            b_o = tl.dot(b_q * b_qdec, b_S, input_precision=DOT_PREC)
            b_o += tl.dot(b_A, b_v, input_precision=DOT_PREC)
            b_o *= scale
            p_o = o + ((bos + o_t)[:, None] * H + i_h) * V + o_v[None, :]
            tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)

        b_kend = b_k * tl.exp(b_bl[None, :] - b_b)  # [C, BK], exponent <= 0
        b_S = b_S * tl.exp(b_bl)[:, None] + tl.dot(tl.trans(b_kend), b_v, input_precision=DOT_PREC)

    if STORE_FINAL_STATE:
        tl.store(ht + state_base + o_state, b_S, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_gla_bwd_kernel_dqkvg(
    q,
    k,
    v,
    g,
    h,
    do,
    dht,
    dq,
    dk,
    dv,
    dg,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    B,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    # this program's sequence: rows [bos, bos + T_seq) of the flattened tokens, its saved states from chunk boc
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
    # dq, dk, dg partials of this V block: [NV, B, T, H|HKV, K]
    part = i_v.to(tl.int64) * B * T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    state_base = i_bh.to(tl.int64) * K * V

    # gradient of the state leaving the current chunk
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dS += tl.load(dht + state_base + o_state, mask=m_kv, other=0.0).to(tl.float32)

    causal = o_c[:, None] >= o_c[None, :]  # s <= t (inclusive), indexed [t, s]
    strict = o_c[:, None] > o_c[None, :]  # s < t (or s < r), indexed [t|r, s]
    is_last = o_c == C - 1

    for i_i in range(0, NT_seq):
        i_n = NT_seq - 1 - i_i
        o_t = i_n * C + o_c
        m_t = o_t < T_seq
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row_kv = bos + o_t

        p_k = k + (row_kv[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_g = g + (row_kv[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_v = v + (row_kv[:, None] * HKV + i_hk) * V + o_v[None, :]
        b_k = tl.load(p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(p_g, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_tv, other=0.0).to(tl.float32)
        p_h = h + ((boc + i_n) * HKV + i_hk) * K * V + o_state
        b_S = tl.load(p_h, mask=m_kv, other=0.0)  # state entering the chunk

        b_b = tl.cumsum(b_g, axis=0)
        b_bl = tl.sum(tl.where(is_last[:, None], b_b, 0.0), axis=0)  # [BK]
        b_diff = b_b[:, None, :] - b_b[None, :, :]
        b_decay = tl.exp(tl.where(causal[:, :, None], b_diff, float("-inf")))  # [C(t), C(s), BK]
        b_kdec = b_k[None, :, :] * b_decay
        b_qdec = tl.exp(b_b)  # [C, BK]
        b_ebl = tl.exp(b_bl)  # [BK]
        b_eend = tl.exp(b_bl[None, :] - b_b)  # [C, BK]

        # contributions through the state leaving the chunk
        b_dv = tl.dot(b_k * b_eend, b_dS, input_precision=DOT_PREC)  # [C, BV]
        b_dk = b_eend * tl.dot(b_v, tl.trans(b_dS), input_precision=DOT_PREC)  # [C, BK]
        # decay gradient: state entering -> state leaving (every r), chunk keys s < r -> state leaving
        b_dg = tl.sum(b_S * b_dS, axis=1) * b_ebl  # [BK]
        b_w = b_k * b_dk
        b_dg_rows = tl.sum(tl.where(strict[:, :, None], b_w[None, :, :], 0.0), axis=1)  # [C(r), BK]
        b_dg_rows += b_dg[None, :]

        b_dS_prev = b_dS * b_ebl[:, None]
        b_qdq = tl.zeros([C, BK], dtype=tl.float32)  # sum over heads of q * (inter-chunk part of dq)
        b_Qd = tl.zeros([C, C, BK], dtype=tl.float32)  # sum over heads of q_t dA[t, s]
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            row_q = (bos + o_t)[:, None] * H + i_h
            b_q = tl.load(q + row_q * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_do = tl.load(do + row_q * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)

            b_dA = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC) * scale  # [C(t), C(s)]
            b_dA = tl.where(causal, b_dA, 0.0)
            b_A = tl.sum(b_q[:, None, :] * b_kdec, axis=2) * scale  # [C(t), C(s)], zero for s > t
            b_dv += tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC)

            b_dq_inter = b_qdec * tl.dot(b_do, tl.trans(b_S), input_precision=DOT_PREC) * scale
            b_dq = b_dq_inter + tl.sum(b_dA[:, :, None] * b_kdec, axis=1)
            p_dq = dq + ((part + bos + o_t)[:, None] * H + i_h) * K + o_k[None, :]
            tl.store(p_dq, b_dq, mask=m_tk)

            b_qdq += b_q * b_dq_inter
            b_Qd += b_q[:, None, :] * b_dA[:, :, None]
            b_dS_prev += tl.dot(tl.trans(b_q * b_qdec), b_do, input_precision=DOT_PREC) * scale

        # keys -> queries of the chunk
        b_dk += tl.sum(b_Qd * b_decay, axis=0)
        # decay gradient: state entering -> queries t >= r, keys s < r -> queries t >= r
        b_dg_rows += tl.cumsum(b_qdq, axis=0, reverse=True)
        b_x = tl.where(strict[:, :, None], b_Qd * b_kdec, 0.0)  # [C(t), C(s), BK], pairs s < t
        b_z = tl.cumsum(b_x, axis=0, reverse=True)  # [C(r), C(s), BK]: sum over t >= r
        b_dg_rows += tl.sum(tl.where(strict[:, :, None], b_z, 0.0), axis=1)

        p_dk = dk + ((part + row_kv)[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_dg = dg + ((part + row_kv)[:, None] * HKV + i_hk) * K + o_k[None, :]
        p_dv = dv + (row_kv[:, None] * HKV + i_hk) * V + o_v[None, :]
        tl.store(p_dk, b_dk, mask=m_tk)
        tl.store(p_dg, b_dg_rows, mask=m_tk)
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dS = b_dS_prev

    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + state_base + o_state, b_dS, mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    return BK, BV


def _varlen_layout(cu_seqlens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Boundaries `[N + 1]` -> (cu_seqlens, chunk_offsets) as int64 on `device`, N and the total chunk count.

    chunk_offsets[n] is the index of sequence n's first chunk among the saved states (chunk counts differ per
    sequence); computed on the host, which reads cu_seqlens once (a device sync on CUDA).
    """
    lengths = cu_seqlens.detach().to("cpu", torch.int64).diff()
    chunks = (lengths + CHUNK - 1) // CHUNK
    chunk_offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    cu = cu_seqlens.detach().to(device=device, dtype=torch.int64).contiguous()
    return cu, chunk_offsets.to(device), len(lengths), int(chunk_offsets[-1])


def chunk_gla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    save_states: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns o `[B, T, H, V]` (q.dtype), the final state or None, and the states entering every chunk or None.

    The final state is `[B, HKV, K, V]`, or `[N, HKV, K, V]` with cu_seqlens; the saved states are
    `[total chunks, HKV, K, V]`, chunk i of sequence n at row chunk_offsets[n] + i (n * NT + i without cu_seqlens).
    """
    B, T, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, CHUNK)
    if cu_seqlens is None:
        cu, chunk_offsets, N, NT_total = None, None, B, B * NT
    else:
        cu, chunk_offsets, N, NT_total = _varlen_layout(cu_seqlens, q.device)
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, HKV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    h = torch.empty(NT_total, HKV, K, V, dtype=torch.float32, device=q.device) if save_states else None
    chunk_gla_fwd_kernel_o[(NV, N * HKV)](
        q,
        k,
        v,
        g,
        o,
        initial_state,
        ht,
        h,
        cu,
        chunk_offsets,
        scale,
        T,
        NT,
        H=H,
        HKV=HKV,
        G=H // HKV,
        K=K,
        V=V,
        C=CHUNK,
        BK=BK,
        BV=BV,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
        SAVE_STATES=save_states,
        IS_VARLEN=cu is not None,
        DOT_PREC=dot_precision(q, k, v, g),
        num_warps=4,
    )
    return o, ht, h


def chunk_gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    need_dh0: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns fp32 dq, dk, dv, dg and dh0 (or None; `[N, HKV, K, V]` with cu_seqlens)."""
    B, T, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, CHUNK)
    if cu_seqlens is None:
        cu, chunk_offsets, N = None, None, B
    else:
        cu, chunk_offsets, N, _ = _varlen_layout(cu_seqlens, q.device)
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    dev = q.device
    dq = torch.empty(NV, B, T, H, K, dtype=torch.float32, device=dev)
    dk = torch.empty(NV, B, T, HKV, K, dtype=torch.float32, device=dev)
    dg = torch.empty(NV, B, T, HKV, K, dtype=torch.float32, device=dev)
    dv = torch.empty(B, T, HKV, V, dtype=torch.float32, device=dev)
    dh0 = torch.empty(N, HKV, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    chunk_gla_bwd_kernel_dqkvg[(NV, N * HKV)](
        q,
        k,
        v,
        g,
        h,
        do,
        dht,
        dq,
        dk,
        dv,
        dg,
        dh0,
        cu,
        chunk_offsets,
        scale,
        B,
        T,
        NT,
        H=H,
        HKV=HKV,
        G=H // HKV,
        K=K,
        V=V,
        C=CHUNK,
        BK=BK,
        BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None,
        STORE_INITIAL_STATE_GRADIENT=need_dh0,
        IS_VARLEN=cu is not None,
        DOT_PREC=dot_precision(q, k, v, g, do),
        num_warps=4,
    )
    return dq.sum(0), dk.sum(0), dv, dg.sum(0), dh0


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens=None):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5))
        o, ht, h = chunk_gla_fwd(
            q, k, v, g, scale, initial_state, output_final_state, save_states=save, cu_seqlens=cu_seqlens
        )
        if save:
            ctx.save_for_backward(q, k, v, g, h)
        ctx.scale = scale
        ctx.has_initial_state = initial_state is not None
        ctx.cu_seqlens = cu_seqlens
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h = ctx.saved_tensors
        if dht is not None:
            dht = dht.float().contiguous()
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q,
            k,
            v,
            g,
            h,
            do.contiguous(),
            dht,
            ctx.scale,
            need_dh0=ctx.has_initial_state,
            cu_seqlens=ctx.cu_seqlens,
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), None, dh0, None, None


def triton_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with Triton kernels, differentiable w.r.t. q, k, v, g and initial_state.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads (query head h reads key head h // (H // Hkv)).
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros.
        output_final_state: whether to return the state after the last token.
        cu_seqlens: optional `[N + 1]` boundaries of N sequences packed along T (B must be 1); the state restarts
            at each one, initial_state and the final state are then `[N, Hkv, K, V]`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None.
    """
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    return ChunkGLAFunction.apply(q, k, v, g, float(scale), initial_state, output_final_state, cu_seqlens)
