"""One Parallax decode step in Triton (methods.md 4.8): the new token's query over its KV cache.

One program per (batch row, query head) streams the visible part of the cache in blocks of BLOCK_N keys with the
forward's online softmax (log2 domain, the four fp32 accumulators d1, d2, O1, O2, a finite starting max). With a
single query the scores are row reductions rather than tl.dot, so no tile needs 16 rows. Invalid or out-of-window
slots are never loaded (unfilled cache slots may hold anything). Forward only: decoding needs no gradient.
"""

import math

import torch
import triton
import triton.language as tl

from .reference import check_decode_inputs

BLOCK_N = 64  # keys per inner step
LOG2E = math.log2(math.e)


@triton.jit(do_not_specialize=["L", "start"])
def parallax_decode_kernel(
    q,  # [B, H, D]
    r,  # [B, H, D]
    k,  # [B, L, HKV, D]
    v,  # [B, L, HKV, D]
    valid,  # [B, L] uint8
    o,  # [B, H, D]
    qk_scale,  # scale * log2(e)
    L,
    start,  # first slot inside the window
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q + (b64 * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_r = tl.load(r + (b64 * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)

    # statistics as [1] tensors: the loop carries one type from start to end
    b_m = tl.full([1], -1e30, dtype=tl.float32)
    b_d1 = tl.zeros([1], dtype=tl.float32)
    b_d2 = tl.zeros([1], dtype=tl.float32)
    b_o1 = tl.zeros([BD], dtype=tl.float32)
    b_o2 = tl.zeros([BD], dtype=tl.float32)
    for n0 in range((start // BN) * BN, L, BN):
        o_n = n0 + tl.arange(0, BN)
        ok = (o_n >= start) & (o_n < L)
        if HAS_VALID:
            ok = ok & (tl.load(valid + b64 * L + o_n, mask=ok, other=0) != 0)
        p_kv = ((b64 * L + o_n.to(tl.int64)) * HKV + i_hk)[:, None] * D + o_d[None, :]
        m_kv = ok[:, None] & m_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BN, BD]
        b_v = tl.load(v + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_z = tl.sum(b_k * b_q[None, :], 1) * qk_scale  # [BN]
        b_s = tl.sum(b_k * b_r[None, :], 1)
        m_new = tl.maximum(b_m, tl.max(tl.where(ok, b_z, float("-inf"))[None, :], 1))
        b_w = tl.exp2(tl.where(ok, b_z - m_new, float("-inf")))
        b_ws = b_w * b_s
        alpha = tl.exp2(b_m - m_new)
        b_d1 = b_d1 * alpha + tl.sum(b_w[None, :], 1)
        b_d2 = b_d2 * alpha + tl.sum(b_ws[None, :], 1)
        b_o1 = b_o1 * alpha + tl.sum(b_w[:, None] * b_v, 0)
        b_o2 = b_o2 * alpha + tl.sum(b_ws[:, None] * b_v, 0)
        b_m = m_new

    seen = b_d1 > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, b_d1, 1.0), 0.0)  # a query that sees no key gets o = 0
    b_o = b_o1 * inv * (1.0 + b_d2 * inv) - b_o2 * inv
    tl.store(o + (b64 * H + i_h) * D + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


def triton_parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """One Parallax decode step in one kernel launch; arguments and returns as in `naive_parallax_decode`.
    `block_n` (a power of two) sets the keys per inner step, for tests."""
    check_decode_inputs(q, r, k_cache, v_cache, cache_valid, window)
    B, H, D = q.shape
    L, HKV = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    start = 0 if window is None else max(L - int(window), 0)
    if cache_valid is not None:
        cache_valid = cache_valid.contiguous().view(torch.uint8)  # same bytes as bool, a plain integer pointer
    q, r, k_cache, v_cache = (x.contiguous() for x in (q, r, k_cache, v_cache))
    o = torch.empty_like(q)
    BD = triton.next_power_of_2(D)
    parallax_decode_kernel[(B * H,)](
        q, r, k_cache, v_cache, cache_valid, o, scale * LOG2E, L, start,
        H=H, HKV=HKV, G=H // HKV, D=D, BD=BD, BN=block_n, HAS_VALID=cache_valid is not None,
        num_warps=4 if BD * block_n <= 8192 else 8,
    )  # fmt: skip
    return o
