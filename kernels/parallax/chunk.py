"""Parallax attention in PyTorch without a [T, S] matrix: blockwise online softmax forward, blockwise backward
(docs/methods.md §4.1 and §4.7), and a decode step.

Queries go in blocks of C; keys in blocks of C aligned to the query blocks (the history padded on the left to whole
blocks). Query block i and key block i - d have the same [C, C] causal/window mask for every i, so the loop runs
over the block offset d and handles all query blocks at once: one batched matmul per product and offset, only the
causal (or windowed) band of blocks, at most T x C scores alive at a time. The block index leads every layout, so
the blocks of one offset are a contiguous slice (no copies before the matmuls, in-place accumulator updates). GQA
folds the G query heads of a key head into the rows of a block (`[G * C, D]` against `[C, D]` keys), so K/V are
never repeated.

Forward accumulators per query (docs/methods.md §4.1): d1 = sum w, d2 = sum w s, O1 = sum w v, O2 = sum w s v with
w = exp(z - m) rescaled as the running max m grows; o = (O1 / d1) (1 + d2 / d1) - O2 / d1. Saved for the backward:
o, v_bar = O1 / d1, t_bar = d2 / d1 and the log-sum-exp, all in the accumulation dtype (fp32, or float64 for
float64 inputs). Backward per block, with p = exp(z - lse), a = dO . v, t = dO . o, b = dO . v_bar:
    gl = p (a - t + (t_bar - s)(a - b)),  gu = -p (a - b),  c = p (1 + t_bar - s);
    dq = scale gl k,  dr = gu k,  dk = scale gl^T q + gu^T r,  dv = c^T dO.
With a softcap the logit is z = cap tanh(scale q . k / cap), and gl (the gradient of z) is multiplied by its
derivative 1 - tanh(scale q . k / cap)^2 before dq and dk. Without one, both passes take the keys minus their mean
(`common.centring.key_mean`), which changes nothing but the rounding (keys sharing a large component, a k_proj
bias, left fp32 dq 1e-3 off).
"""

import torch
import torch.nn.functional as F

from ..common.centring import key_mean
from ..common.masks import all_valid_known
from .reference import check_decode_inputs, check_inputs, with_history

FLOOR = -1e30  # finite start of the running max: a query with no visible key yet gets alpha = 1, not NaN


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


class _Blocks:
    """Block layout of one call: queries `[N, B, Hkv, G * C, D]`, keys `[NP + N, B, Hkv, C, D]`."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, C: int, dtype: torch.dtype):
        B, T, H, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        self.B, self.T, self.S, self.Hkv, self.G, self.D, self.C, self.dtype = B, T, S, Hkv, H // Hkv, D, C, dtype
        self.N = -(-T // C)
        self.NP = -(-(S - T) // C)  # key blocks of history
        self.left = self.NP * C - (S - T)  # padding before the first key
        self.right = self.N * C - T  # after the last query and key

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, H, D]` -> `[N, B, Hkv, G * C, D]`; row g * C + c of block n is query n * C + c of head g."""
        B, Hkv, G, C, D = self.B, self.Hkv, self.G, self.C, self.D
        x = F.pad(x.to(self.dtype), (0, 0, 0, 0, 0, self.right)).view(B, self.N, C, Hkv, G, D)
        return x.permute(1, 0, 3, 4, 2, 5).reshape(self.N, B, Hkv, G * C, D)

    def unqueries(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, Hkv, G, C, D = self.B, self.Hkv, self.G, self.C, self.D
        x = x.view(self.N, B, Hkv, G, C, D).permute(1, 0, 4, 2, 3, 5).reshape(B, self.N * C, Hkv * G, D)
        return x[:, : self.T].to(dtype)

    def keys(self, x: torch.Tensor, valid: torch.Tensor | None, center: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, S, Hkv, D]` -> `[NP + N, B, Hkv, C, D]`, minus `center` `[B, 1, Hkv, D]` if given, zero at invalid
        keys (padding may hold NaN, and 0 * NaN would leak through the masked products)."""
        x = x.to(self.dtype)
        if center is not None:
            x = x - center
        if valid is not None:
            x = x.masked_fill(~valid[:, :, None, None], 0.0)
        x = F.pad(x, (0, 0, 0, 0, self.left, self.right)).view(self.B, self.NP + self.N, self.C, self.Hkv, self.D)
        return x.permute(1, 0, 3, 2, 4).contiguous()

    def unkeys(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.permute(1, 0, 3, 2, 4).reshape(self.B, (self.NP + self.N) * self.C, self.Hkv, self.D)
        return x[:, self.left : self.left + self.S].to(dtype)

    def valid(self, key_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """`[NP + N, B, 1, 1, C]` bool: the key exists and is valid."""
        if key_valid is None:
            key_valid = torch.ones(self.B, self.S, dtype=torch.bool, device=device)
        valid = F.pad(key_valid, (self.left, self.right), value=False).view(self.B, -1, 1, 1, self.C)
        return valid.transpose(0, 1)

    def bands(self, window: int, device: torch.device):
        """Yield (query block slice, key block slice, `[G * C, C]` mask) for every block offset a window reaches."""
        C, N, NP = self.C, self.N, self.NP
        row = torch.arange(self.G * C, device=device)[:, None] % C
        col = torch.arange(C, device=device)[None, :]
        # query block i's first query reaches key block i - d's last key iff d C - (C - 1) <= window - 1
        for d in range(min(N - 1 + NP, (window + C - 2) // C) + 1):
            i0 = max(0, d - NP)
            lag = d * C + row - col  # query position minus key position
            yield slice(i0, N), slice(i0 - d + NP, N - d + NP), (lag >= 0) & (lag < window)


class ChunkParallaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, key_valid, scale, softcap, window, block_size):
        blk = _Blocks(q, k, block_size, _acc_dtype(q, r, k, v))
        # a cap is not shift-invariant: capped logits take the keys as they are
        center = None if softcap is not None else key_mean(k, key_valid, blk.dtype)
        qb, rb = blk.queries(q), blk.queries(r)  # [N, B, Hkv, GC, D]
        kb, vb = blk.keys(k, key_valid, center), blk.keys(v, key_valid)  # [M, B, Hkv, C, D]
        valid = blk.valid(key_valid, q.device)
        m = qb.new_full(qb.shape[:-1], FLOOR)  # [N, B, Hkv, GC]
        d1, d2 = qb.new_zeros(qb.shape[:-1]), qb.new_zeros(qb.shape[:-1])
        o1, o2 = torch.zeros_like(qb), torch.zeros_like(qb)
        for qs, ks, band in blk.bands(window, q.device):
            kk, vv = kb[ks], vb[ks]
            z = _cap(qb[qs] @ kk.mT * scale, softcap).masked_fill_(~(band & valid[ks]), float("-inf"))
            s = rb[qs] @ kk.mT
            m_new = torch.maximum(m[qs], z.amax(-1))
            alpha = torch.exp(m[qs] - m_new)
            w = torch.exp(z.sub_(m_new[..., None]))
            ws = w * s
            d1[qs].mul_(alpha).add_(w.sum(-1))
            d2[qs].mul_(alpha).add_(ws.sum(-1))
            o1[qs].mul_(alpha[..., None]).add_(w @ vv)
            o2[qs].mul_(alpha[..., None]).add_(ws @ vv)
            m[qs] = m_new
        seen = d1 > 0
        inv = torch.where(seen, 1 / d1.where(seen, 1.0), 0.0)  # a query that sees no key gets o = 0
        v_bar, t_bar = o1 * inv[..., None], d2 * inv
        o = v_bar * (1 + t_bar[..., None]) - o2 * inv[..., None]
        if any(ctx.needs_input_grad[:4]):
            lse = torch.where(seen, m + torch.log(d1.where(seen, 1.0)), 0.0)  # finite; p is masked anyway
            ctx.save_for_backward(q, r, k, v, key_valid, center, o, v_bar, t_bar, lse)
            ctx.config = (scale, softcap, window, block_size)
        return blk.unqueries(o, q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, r, k, v, key_valid, center, o, v_bar, t_bar, lse = ctx.saved_tensors
        scale, softcap, window, block_size = ctx.config
        blk = _Blocks(q, k, block_size, o.dtype)
        qb, rb, dob = blk.queries(q), blk.queries(r), blk.queries(do)
        kb, vb = blk.keys(k, key_valid, center), blk.keys(v, key_valid)  # the forward's keys: lse is theirs
        valid = blk.valid(key_valid, q.device)
        t, b = (dob * o).sum(-1), (dob * v_bar).sum(-1)  # [N, B, Hkv, GC]
        dq, dr = torch.zeros_like(qb), torch.zeros_like(rb)
        dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)
        for qs, ks, band in blk.bands(window, q.device):
            kk, vv, qq, rr, dd = kb[ks], vb[ks], qb[qs], rb[qs], dob[qs]
            z = _cap(qq @ kk.mT * scale, softcap)
            slope = None if softcap is None else 1 - (z / softcap).square_()  # d z / d (scale q . k): 1 - tanh^2
            z.masked_fill_(~(band & valid[ks]), float("-inf"))
            s = rr @ kk.mT
            p = torch.exp(z.sub_(lse[qs, ..., None]))
            a = dd @ vv.mT
            # in place where a tile is not needed again: these [T, C]-sized temporaries dominate the time
            amb = a.sub_(b[qs, ..., None])  # a - b
            shift = s.neg_().add_(t_bar[qs, ..., None])  # t_bar - s
            neg_gu = p * amb
            gl = (amb * shift).add_(amb).add_(b[qs, ..., None] - t[qs, ..., None]).mul_(p)  # a - b + b - t
            if slope is not None:
                gl.mul_(slope)  # now the gradient of the uncapped logit scale q . k
            dq[qs] += gl @ kk
            dr[qs] -= neg_gu @ kk
            dk[ks] += scale * (gl.mT @ qq) - neg_gu.mT @ rr
            dv[ks] += shift.add_(1).mul_(p).mT @ dd  # c = p (1 + t_bar - s)
        return (
            blk.unqueries(dq * scale, q.dtype),
            blk.unqueries(dr, r.dtype),
            blk.unkeys(dk, k.dtype),
            blk.unkeys(dv, v.dtype),
        ) + (None,) * 5


def _cap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits z capped in place to softcap * tanh(z / softcap); z as it is without a cap."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def chunk_parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Parallax attention, blockwise; arguments and returns as in `naive_parallax_attention`.

    Differentiable w.r.t. q, r, k, v, past_k and past_v. `block_size` is C, the queries (and keys) per block.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    keys, values = with_history(k, v, past_k, past_v)
    S, D = keys.shape[1], q.shape[-1]
    window = S if window is None else min(window, S)
    scale = D**-0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    return ChunkParallaxFunction.apply(q, r, keys, values, key_valid, scale, softcap, window, block_size)


@torch.no_grad()
def rowwise_parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    block_size: int = 32,
    block_logits: int = 1 << 22,
) -> torch.Tensor:
    """Parallax attention for inference (no autograd); arguments and returns as in `naive_parallax_attention`.

    The faster CPU form of the blockwise forward above: queries go in blocks of `block_size` (fewer when a block's
    whole rows of scores would exceed `block_logits` numbers), so each softmax is exact at once (no running max to
    rescale by) and a block takes three products: `q k^T`, `r k^T`, then the weights `p (1 + t_bar - s)` times v,
    where the online form needs four and rescales four accumulators at every key block.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    keys, values = with_history(k, v, past_k, past_v)
    B, T, H, D = q.shape
    S, Hkv = keys.shape[1], keys.shape[2]
    G, P = H // Hkv, S - T
    window = S if window is None else min(window, S)
    scale = D**-0.5 if scale is None else float(scale)
    dtype = _acc_dtype(q, r, keys, values)
    if key_valid is not None:  # padding may hold NaN, and 0 * NaN would leak through the masked products
        keys, values = (x.masked_fill(~key_valid[:, :, None, None], 0.0) for x in (keys, values))
    kk, vv = (x.to(dtype).transpose(1, 2) for x in (keys, values))  # [B, Hkv, S, D]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, Hkv, T * G, D]: a block of tokens is a slice
        return x.to(dtype).view(B, T, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, T * G, D)

    # scaled after the upcast: a half-precision q * scale would round every query again (unless scale is a power
    # of two), up to 10x the bf16 output error with peaked scores at D = 128
    qq, rr = rows(q) * scale, rows(r)
    out = q.new_empty(B, Hkv, T * G, D, dtype=dtype)
    step = max(1, min(block_size, block_logits // (B * H * window)))
    for i0 in range(0, T, step):
        i1 = min(i0 + step, T)
        lo, hi = max(0, P + i0 - window + 1), P + i1  # the keys this block's queries reach
        block, keys_t = slice(i0 * G, i1 * G), kk[:, :, lo:hi].mT
        z = (qq[:, :, block] @ keys_t).view(B, Hkv, i1 - i0, G, hi - lo)
        s = (rr[:, :, block] @ keys_t).view(B, Hkv, i1 - i0, G, hi - lo)
        _cap(z, softcap)
        # without padding or a window edge in the block, only the keys from the block's first query on need a mask
        first = lo if key_valid is not None or P + i1 - window > lo else P + i0
        lag = torch.arange(P + i0, P + i1, device=q.device)[:, None] - torch.arange(first, hi, device=q.device)
        visible = ((lag >= 0) & (lag < window))[None]  # [1, n, W']
        if key_valid is not None:
            visible = visible & key_valid[:, None, lo:hi]
        z[..., first - lo :].masked_fill_(~visible[:, None, :, None], float("-inf"))
        m = z.amax(-1, keepdim=True)
        w = z.sub_(m.masked_fill_(m == float("-inf"), 0.0)).exp_()  # unnormalised softmax weights
        d1 = w.sum(-1, keepdim=True)
        inv = torch.where(d1 > 0, 1 / d1, 0.0)  # a query that sees no key gets zeros
        ws = w * s
        t_bar = ws.sum(-1, keepdim=True).mul_(inv)
        weights = w.mul_(t_bar.add_(1)).sub_(ws).view(B, Hkv, (i1 - i0) * G, hi - lo)  # d1 p (1 + t_bar - s)
        torch.matmul(weights, vv[:, :, lo:hi], out=out[:, :, block]).mul_(inv.view(B, Hkv, (i1 - i0) * G, 1))
    return out.view(B, Hkv, T, G, D).transpose(1, 2).reshape(B, T, H, D).to(q.dtype)


def torch_parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One Parallax decode step; arguments and returns as in `naive_parallax_decode`. One query per sequence, so
    the visible keys' scores are a single row; GQA folds the G heads of a key head into it. `[q; r]` against K in
    one product gives z and s, then the weights `p (1 + t_bar - s)` (docs/methods.md §4.2) against V give o, as
    `rowwise_parallax_attention` does for a block: each key and value is read once, and a step is two products and
    a dozen small ops (at decode, the count of ops is most of the cost). The cache may be any strided view (a
    head-major `[B, Hkv, L, D]` storage seen as `[B, L, Hkv, D]` reads each head's keys contiguously)."""
    check_decode_inputs(q, r, k_cache, v_cache, cache_valid, window)
    B, H, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    dtype = _acc_dtype(q, r, k_cache, v_cache)
    scale = D**-0.5 if scale is None else scale
    if window is not None and window < L:
        k_cache, v_cache = k_cache[:, L - window :], v_cache[:, L - window :]
        cache_valid = None if cache_valid is None else cache_valid[:, L - window :]
    # a cache known to be all valid takes the one-op softmax below
    hidden = None if cache_valid is None or all_valid_known(cache_valid) else ~cache_valid  # [B, W]
    if hidden is not None:  # unfilled slots may hold anything, NaN included: keep them out of the products
        k_cache = k_cache.masked_fill(hidden[..., None, None], 0.0)
        v_cache = v_cache.masked_fill(hidden[..., None, None], 0.0)
    kk, vv = k_cache.to(dtype).permute(0, 2, 3, 1), v_cache.to(dtype).transpose(1, 2)  # [B, Hkv, D, W], [B, Hkv, W, D]
    qr = torch.cat([q.view(B, Hkv, G, D).to(dtype) * scale, r.view(B, Hkv, G, D).to(dtype)], dim=2)
    zs = qr @ kk  # [B, Hkv, 2G, W]: z = scale q . k, then s = r . k
    z, s = zs[:, :, :G], zs[:, :, G:]
    _cap(z, softcap)
    if hidden is None:
        p = z.softmax(-1)  # one op, where the masked form below takes five
    else:
        z.masked_fill_(hidden[:, None, None], float("-inf"))
        m = z.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)
        p = z.sub_(m).exp_()
        d1 = p.sum(-1, keepdim=True)
        d1.masked_fill_(d1 == 0, float("inf"))  # a query that sees no key: p = 0, so o = 0
        p.div_(d1)
    ps = s.mul_(p)
    weights = p.mul_(ps.sum(-1, keepdim=True).add_(1)).sub_(ps)  # p (1 + t_bar - s)
    return (weights @ vv).view(B, H, D).to(q.dtype)
