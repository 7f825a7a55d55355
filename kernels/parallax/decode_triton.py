"""One Parallax decode step in Triton (docs/methods.md §4.8): the new token's query over its KV cache.

One query per (batch row, head) against a long cache is latency-bound: with one program per query head, a B = 1
step of 32 heads would keep 32 of an H100's 132 SMs busy. So the visible part of the cache is split into NS
contiguous parts of `split` keys and one program per (batch row * query head, part) streams its part in blocks of
BN keys with the forward's online softmax (`common.tiles.online_softmax`, log2 domain, finite starting max) and
Parallax's accumulators d2 = sum w s, O1 = sum w v and O2 = sum (w s) v, in fp32. With one part the program writes
the output; with several, each writes its partial (m, d1, d2, O1, O2) and `parallax_decode_combine_kernel` merges
them, each rescaled by 2^(m_part - max m), before the output o = (O1 / d1)(1 + d2 / d1) - O2 / d1. The programs of
one part for the G query heads of a key head run side by side and read the same keys, mostly from L2.

With a single query the scores are row reductions (products in fp32 of the model-dtype cache) rather than tl.dot,
so no tile needs 16 rows. Invalid or out-of-window slots are never loaded (unfilled cache slots may hold anything).
The cache is read through its strides, so Parallax's head-major growing cache (a `[B, L, HKV, D]` view of
`[B, HKV, L + room, D]` storage) is not copied at each step. Forward only: decoding needs no gradient.
"""

import torch
import triton
import triton.language as tl

from ..common.launch import LOG2E, as_bytes, pow2
from ..common.tiles import NEG_INIT, online_softmax, valid_rows
from .reference import check_decode_inputs

BLOCK_N = 64  # keys per inner step
MIN_SPLIT = 512  # keys per program at least: the partial it writes (2 D + 3 floats) stays small beside its reads
TARGET_PROGRAMS = 512  # enough programs to fill every SM of an A100 or H100 several times over


@triton.jit
def _output(b_o1, b_o2, b_d1, b_d2):
    """o = (O1 / d1)(1 + d2 / d1) - O2 / d1; zeros for a query that saw no key (d1 == 0)."""
    seen = b_d1 > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, b_d1, 1.0), 0.0)
    return b_o1 * inv * (1.0 + b_d2 * inv) - b_o2 * inv


@triton.jit(do_not_specialize=["L", "start", "split", "NS"])
def parallax_decode_kernel(
    q,  # [B, H, D]
    r,  # [B, H, D]
    k,  # [B, L, HKV, D], strided (token-major or head-major storage), the last dimension contiguous
    v,  # [B, L, HKV, D], the same strides
    valid,  # [B, L] uint8
    o,  # [B, H, D]
    part_o,  # [B, H, NS, 2, D] fp32: O1 and O2 of each part (SPLIT only)
    part_s,  # [B, H, NS, 3] fp32: m, d1 and d2 of each part (SPLIT only)
    stride_b,
    stride_l,
    stride_h,
    qk_scale,  # scale * log2(e)
    L,
    start,  # first slot inside the window
    split,  # keys per part, a multiple of BN
    NS,  # parts
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,  # NS > 1
    HAS_VALID: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q + (b64 * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_r = tl.load(r + (b64 * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)

    # statistics as [1] tensors: online_softmax reduces along axis 1 of a [1, BN] score row
    b_m = tl.full([1], NEG_INIT, dtype=tl.float32)
    b_d1 = tl.zeros([1], dtype=tl.float32)
    b_d2 = tl.zeros([1], dtype=tl.float32)
    b_o1 = tl.zeros([BD], dtype=tl.float32)
    b_o2 = tl.zeros([BD], dtype=tl.float32)
    lo = start + i_s * split
    for n0 in range(lo, tl.minimum(lo + split, L), BN):
        o_n = n0 + tl.arange(0, BN)
        ok = valid_rows(valid, b64, o_n, L, HAS_VALID)
        p_kv = b64 * stride_b + i_hk * stride_h + o_n.to(tl.int64)[:, None] * stride_l + o_d[None, :]
        m_kv = ok[:, None] & m_d[None, :]  # invalid slots are never read (they may hold anything)
        b_k = tl.load(k + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BN, BD]
        b_z = tl.sum(b_k * b_q[None, :], 1)[None, :] * qk_scale  # [1, BN]
        b_s = tl.sum(b_k * b_r[None, :], 1)[None, :]
        b_w, alpha, b_m, b_d1 = online_softmax(b_z, ok[None, :], b_m, b_d1)
        b_ws = b_w * b_s
        b_d2 = b_d2 * alpha + tl.sum(b_ws, 1)
        b_v = tl.load(v + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_o1 = b_o1 * alpha + tl.sum(tl.trans(b_w) * b_v, 0)
        b_o2 = b_o2 * alpha + tl.sum(tl.trans(b_ws) * b_v, 0)

    if not SPLIT:
        tl.store(o + (b64 * H + i_h) * D + o_d, _output(b_o1, b_o2, b_d1, b_d2).to(o.dtype.element_ty), mask=m_d)
    else:
        part = (b64 * H + i_h) * NS + i_s
        tl.store(part_o + part * 2 * D + o_d, b_o1, mask=m_d)
        tl.store(part_o + (part * 2 + 1) * D + o_d, b_o2, mask=m_d)
        o_3 = tl.arange(0, 4)
        b_stats = tl.where(o_3 == 0, b_m, tl.where(o_3 == 1, b_d1, b_d2))
        tl.store(part_s + part * 3 + o_3, b_stats, mask=o_3 < 3)


@triton.jit(do_not_specialize=["NS"])
def parallax_decode_combine_kernel(
    part_o,  # [B, H, NS, 2, D] fp32
    part_s,  # [B, H, NS, 3] fp32
    o,  # [B, H, D]
    NS,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,  # NS rounded up to a power of two
):
    i_bh = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BS)
    m_s = o_s < NS
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_s = part_s + (i_bh * NS + o_s) * 3
    # a missing part (o_s >= NS) reads as one that saw no key
    b_m = tl.load(p_s, mask=m_s, other=NEG_INIT)  # [BS]
    b_w = tl.exp2(b_m - tl.max(b_m, 0))  # each part's rescale to the common max
    b_d1 = tl.sum(b_w * tl.load(p_s + 1, mask=m_s, other=0.0), 0)
    b_d2 = tl.sum(b_w * tl.load(p_s + 2, mask=m_s, other=0.0), 0)
    p_o = part_o + ((i_bh * NS + o_s) * 2)[:, None] * D + o_d[None, :]
    m_sd = m_s[:, None] & m_d[None, :]
    b_o1 = tl.sum(b_w[:, None] * tl.load(p_o, mask=m_sd, other=0.0), 0)  # [BD]
    b_o2 = tl.sum(b_w[:, None] * tl.load(p_o + D, mask=m_sd, other=0.0), 0)
    tl.store(o + i_bh * D + o_d, _output(b_o1, b_o2, b_d1, b_d2).to(o.dtype.element_ty), mask=m_d)


def triton_parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    block_n: int = BLOCK_N,
    split: int | None = None,
) -> torch.Tensor:
    """One Parallax decode step; arguments and returns as in `naive_parallax_decode`. `block_n` (a power of two)
    sets the keys per inner step and `split` (a multiple of it) the keys per program, for tests; by default the
    visible cache is split so that about TARGET_PROGRAMS programs run, each over MIN_SPLIT keys or more."""
    check_decode_inputs(q, r, k_cache, v_cache, cache_valid, window)
    B, H, D = q.shape
    L, HKV = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    start = 0 if window is None else max(L - int(window), 0)
    if split is None:
        parts = max(1, min(triton.cdiv(L - start, MIN_SPLIT), TARGET_PROGRAMS // (B * H)))
        split = triton.cdiv(triton.cdiv(L - start, parts), block_n) * block_n
    elif split < 1 or split % block_n:
        raise ValueError(f"split must be a positive multiple of block_n = {block_n}, got {split}")
    NS = triton.cdiv(L - start, split)
    cache_valid = as_bytes(cache_valid)
    q, r = q.contiguous(), r.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():  # else read in place, rows as they lie
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    o = torch.empty_like(q)
    part_o = torch.empty(B, H, NS, 2, D, dtype=torch.float32, device=q.device) if NS > 1 else None
    part_s = torch.empty(B, H, NS, 3, dtype=torch.float32, device=q.device) if NS > 1 else None
    BD = pow2(D, 1)
    parallax_decode_kernel[(B * H, NS)](
        q, r, k_cache, v_cache, cache_valid, o, part_o, part_s, *k_cache.stride()[:3],
        scale * LOG2E, L, start, split, NS,
        H=H, G=H // HKV, D=D, BD=BD, BN=block_n, SPLIT=NS > 1, HAS_VALID=cache_valid is not None,
        num_warps=4 if BD * block_n < 8192 else 8,  # 32 elements of each fp32 [BN, BD] tile per thread (D <= 128)
    )  # fmt: skip
    if NS > 1:
        parallax_decode_combine_kernel[(B * H,)](part_o, part_s, o, NS, D=D, BD=BD, BS=pow2(NS, 2), num_warps=4)
    return o
