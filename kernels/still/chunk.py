"""Blockwise STILL in PyTorch: no [T, T] matrix, differentiable through autograd.

Self-saliency: every block of queries is scored against the keys its window reaches (overlapping views of the
padded key sequence), blocks batched in groups of bounded size, so the cost is linear in T; one exponential per
logit gives both of the score's softmaxes (the reference computes them apart).

Attention: chunk c reads exactly its own keys, all keys of chunk c - 1 and the salient keys of chunks 0..c-2,
[B, H, C, 2C + salient so far] logits. The non-salient keys of a chunk enter the linear state ([B, H, F, Dv] and
normalizer [B, H, F]) once the chunk is two chunks behind the query's: a prefix sum of per-chunk states, or without
autograd on a CPU one state carried from chunk to chunk in place (the prefix sum's [B, N, H, F, Dv] does not fit in
a CPU's caches at long contexts). Query chunks are computed in blocks, all chunks of a block at once (few large
products rather than a loop of small ones, whose backward would also write a full-size gradient per slice).
"""

import torch
import torch.nn.functional as F

from .reference import SALIENCY_EPS, zero_invalid


def _pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """`[B, T, ...]` -> `[B, T + pad, ...]`, zeros after; x itself when pad is 0 (F.pad would copy it)."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x


def _self_kl_one_exp(z: torch.Tensor, others: torch.Tensor, z_self: torch.Tensor, window: int) -> torch.Tensor:
    """`smoothed_self_kl` (reference.py) from one exponential of the logits instead of two softmaxes.

    With b the softmax over the window without the query's own key and alpha the self weight, the softmax over the
    whole window is alpha at the self slot and (1 - alpha) b elsewhere; alpha = sigmoid(z_self - logsumexp(others))
    stays exact however far the self logit stands above the others.

    Args:
        z: logits `[..., K]` of one query against K candidate keys.
        others: `[..., K]` bool (broadcastable), the keys of the query's window W_t except its own.
        z_self: the logit of the query's own key `[...]`.
        window: l, the nominal window length.

    Returns:
        Scores `[...]`.
    """
    eps = SALIENCY_EPS
    z = z.masked_fill(~others, float("-inf"))
    m = z.amax(-1, keepdim=True)
    e = (z - m.masked_fill(m == float("-inf"), 0.0)).exp_()  # zero outside `others`
    total = e.sum(-1, keepdim=True)  # 0 when the window holds only the query, else >= 1 (the max's term)
    self_margin = z_self[..., None] - (m + total.log())  # +inf without others: alpha = 1
    diag_scale, nodiag_scale = 1 + window * eps, 1 + window * eps + 1 / window
    b = e.div_(total.clamp_min(1.0))
    diag = b * (torch.sigmoid(-self_margin) / diag_scale) + eps / diag_scale
    kl = torch.where(others, diag * torch.log(diag / (b / nodiag_scale + (eps / nodiag_scale + eps))), 0.0)
    diag_self = (torch.sigmoid(self_margin[..., 0]) + eps) / diag_scale
    return kl.sum(-1) + diag_self * torch.log(diag_self / (1 / window + 2 * eps))  # nodiag's self slot: 1/l + eps


@torch.no_grad()
def chunk_self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 16,
    block_logits: int = 1 << 17,
) -> torch.Tensor:
    """Self-saliency score of every token over its window of the last `window` valid keys (itself included).

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        window: l, keys the window reaches back, counting the token itself.
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        block_size: queries per block; a block scores its queries against the block + window - 1 keys they
            reach, so small blocks waste few logits (16 with 2^17 logits took 0.65x the time of 64 with 2^16 on a
            CPU at T = 512 and 8192, same formula, and 2^16 took 0.3x the time of all blocks at once at T = 8192).
        block_logits: about the most logits per batch row scored at once (memory and speed, not results, depend
            on it).

    Returns:
        Detached fp32 scores `[B, T, H]`, -inf at invalid positions.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    Bq = min(block_size, T)
    N = -(-T // Bq)
    W = Bq + window - 1  # keys a block of queries can reach
    pad = N * Bq - T
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    q, k = (zero_invalid(x, key_valid, torch.promote_types(q.dtype, torch.float32)) for x in (q, k))

    # block n holds queries n*Bq + r and keys n*Bq - (window - 1) + c, c < W; keys before 0 are padding
    q = _pad_time(q, pad).view(B, N, Bq, Hkv, H // Hkv, D)
    k = F.pad(k, (0, 0, 0, 0, window - 1, pad)).unfold(1, W, Bq)  # [B, N, Hkv, D, W]
    keys_valid = F.pad(valid, (window - 1, pad), value=False).unfold(1, W, Bq)  # [B, N, W]

    r = torch.arange(Bq, device=q.device)[:, None]
    c = torch.arange(W, device=q.device)[None, :]
    # blocks in groups of about `block_logits` logits per batch row: the score's elementwise chain holds several
    # tensors of the logits' size at once
    step = max(1, block_logits // (H * Bq * W))
    scores = []
    for n0 in range(0, N, step):
        n = slice(n0, n0 + step)
        z = torch.einsum("bnrkgd,bnkdc->bnkgrc", q[:, n], k[:, n]).flatten(2, 3) * scale  # [B, n, H, Bq, W]
        others = (c >= r) & (c < r + window - 1) & keys_valid[:, n, None, None, :]  # [B, n, 1, Bq, W]
        z_self = z.diagonal(window - 1, -2, -1)  # [B, n, H, Bq]: query r's own key is key r + window - 1
        scores.append(_self_kl_one_exp(z, others, z_self, window))  # [B, n, H, Bq]
    scores = torch.cat(scores, dim=1).transpose(2, 3).reshape(B, N * Bq, H)[:, :T]
    return scores.masked_fill(~valid[..., None], float("-inf"))


def _salient_keys(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor, chunk_size: int):
    """The salient keys and values of each chunk, per query head, gathered to the front of the chunk.

    Args:
        k: keys `[B, N * C, Hkv, D]`.
        v: values `[B, N * C, Hkv, Dv]`.
        salient: `[B, N * C, H]` bool, False at invalid positions.
        chunk_size: C.

    Returns:
        ks `[B, N, s, H, D]`, vs `[B, N, s, H, Dv]` and their mask `[B, N, s, H]`, s the largest count of
        salient keys in one chunk and head (slots past a chunk's own count are masked).
    """
    B, L, Hkv, _ = k.shape
    H, C = salient.shape[-1], chunk_size
    N = L // C
    salient = salient.view(B, N, C, H)
    s = int(salient.sum(2).amax()) if salient.numel() else 0  # the one host sync of the op
    idx = torch.argsort((~salient).to(torch.uint8), dim=2, stable=True)[:, :, :s]  # [B, N, s, H], salient first
    row = idx * Hkv + torch.arange(H, device=k.device) // (H // Hkv)  # row of (token, kv head) in a chunk

    def gather(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x = x.reshape(B, N, C * Hkv, d)
        return x.gather(2, row.view(B, N, s * H, 1).expand(-1, -1, -1, d)).view(B, N, s, H, d)

    return gather(k), gather(v), salient.gather(2, idx)


def _sum_two_chunks_behind(x: torch.Tensor) -> torch.Tensor:
    """`[B, N, ...]` per-chunk terms -> `[B, N, ...]`: chunk n gets the sum of the terms of chunks 0..n-2."""
    return torch.cat([torch.zeros_like(x[:, :2]), x[:, :-2]], dim=1).cumsum(1)


def _linear_part(q_feat, k_feat, v, gate, linear_keys, chunk_size):
    """Gated linear numerator and normalizer of every query: chunk n reads the state of chunks 0..n-2, a prefix sum
    of per-chunk states shifted by two.

    Args:
        q_feat: query features `[B, N * C, H, F]`.
        k_feat: key features `[B, N * C, H, F]`.
        v: values `[B, N * C, Hkv, Dv]`.
        gate: `[B, N * C, H, Dv]`.
        linear_keys: `[B, N * C, H]` bool, the keys that enter the state (valid and not salient).
        chunk_size: C.

    Returns:
        num `[B, N, C, H, Dv]`, den `[B, N, C, H]`.
    """
    B, L, H, Fd = q_feat.shape
    Hkv, Dv = v.shape[2:]
    C = chunk_size
    N = L // C
    k_feat = k_feat.masked_fill(~linear_keys[..., None], 0.0).view(B, N, C, Hkv, H // Hkv, Fd)
    chunk_states = torch.einsum("bnckgf,bnckd->bnkgfd", k_feat, v.view(B, N, C, Hkv, Dv)).flatten(2, 3)
    states = _sum_two_chunks_behind(chunk_states)  # [B, N, H, F, Dv]
    norms = _sum_two_chunks_behind(k_feat.sum(2).flatten(2, 3))  # [B, N, H, F]
    q_feat = q_feat.view(B, N, C, H, Fd)
    num = gate.view(B, N, C, H, Dv) * torch.einsum("bnchf,bnhfd->bnchd", q_feat, states)
    return num, torch.einsum("bnchf,bnhf->bnch", q_feat, norms)


@torch.no_grad()
def _linear_part_recurrent(q_feat, k_feat, v, gate, linear_keys, chunk_size):
    """`_linear_part` for inference on a CPU: the state carried from chunk to chunk in place, not prefix-summed.

    The prefix sum materialises every chunk's state, `[B, N, H, F, Dv]` (38 MB a layer for SmolLM2 at 8K tokens),
    and scans it along N three times over; the recurrence keeps one state, which stays in cache. On a 2-core CPU
    it took a layer's linear part from 312 to 84 ms at 8K tokens and from 8.3 to 3.2 ms at 512
    (docs/inference-speed.md). No autograd: the state is updated in place. Arguments and returns as there.
    """
    B, L, H, Fd = q_feat.shape
    Hkv, Dv = v.shape[2:]
    C = chunk_size
    N, G = L // C, H // Hkv
    k_feat = k_feat.masked_fill(~linear_keys[..., None], 0.0).view(B, N, C, Hkv, G * Fd)
    v, q_feat = v.view(B, N, C, Hkv, Dv), q_feat.view(B, N, C, H, Fd)
    num, den = q_feat.new_zeros(B, N, C, H, Dv), q_feat.new_zeros(B, N, C, H)  # chunks 0 and 1 read no state
    state = q_feat.new_zeros(B, Hkv, G * Fd, Dv)  # a group's query heads stacked: [B, H, F, Dv] as a view
    norm = q_feat.new_zeros(B, H, Fd)
    for n in range(2, N):
        folded = k_feat[:, n - 2]  # [B, C, Hkv, G * F]: chunk n - 2 enters the state
        state += folded.permute(0, 2, 3, 1) @ v[:, n - 2].transpose(1, 2)
        norm += folded.sum(1).view(B, H, Fd)
        queries = q_feat[:, n].transpose(1, 2)  # [B, H, C, F]
        num[:, n] = (queries @ state.view(B, H, Fd, Dv)).transpose(1, 2)
        den[:, n] = (queries @ norm[..., None])[..., 0].transpose(1, 2)
    return num.mul_(gate.view(B, N, C, H, Dv)), den


def _softmax_part(q, kw, vw, window_mask, ks, vs, ks_mask, scale, softcap=None):
    """Unnormalised softmax part of a block of query chunks: sum_S e^(z - m) v and sum_S e^(z - m).

    Args:
        q: queries of the chunks `[B, n, C, H, D]`.
        kw: keys of each chunk's window (the previous and its own chunk) `[B, n, 2C, Hkv, D]`.
        vw: their values `[B, n, 2C, Hkv, Dv]`.
        window_mask: `[B, n, C, 2C]` bool, which window keys each query reads (causal and valid).
        ks: salient keys of the chunks before the windows `[B, S, H, D]`.
        vs: their values `[B, S, H, Dv]`.
        ks_mask: `[B, n, S, H]` bool, which salient keys each chunk reads (older than its window, and present).
        scale: logit multiplier.
        softcap: if set, every logit z becomes softcap * tanh(z / softcap).

    Returns:
        num `[B, n, C, H, Dv]`, den `[B, n, C, H]`.
    """
    B, n, C, H, D = q.shape
    Hkv = kw.shape[3]
    G = H // Hkv
    # window and salient logits stay two tensors (no joined copy): each is exponentiated and multiplied apart
    z_window = torch.einsum("bnrkgd,bnckd->bnkgrc", q.view(B, n, C, Hkv, G, D), kw).flatten(2, 3) * scale
    z_salient = torch.einsum("bnrhd,bshd->bnhrs", q, ks) * scale  # [B, n, H, C, S]
    if softcap is not None:
        z_window, z_salient = (softcap * torch.tanh(z / softcap) for z in (z_window, z_salient))
    z_window = z_window.masked_fill(~window_mask[:, :, None], float("-inf"))  # [B, n, H, C, 2C]
    z_salient = z_salient.masked_fill(~ks_mask.transpose(2, 3)[:, :, :, None], float("-inf"))
    # the output depends on m (quirk Q5), so its gradient flows back to the logits; max's backward keeps only where
    # each maximum lies, where amax's keeps the logits themselves (a block's largest tensors, for every block)
    m = z_window.max(-1, keepdim=True).values
    if z_salient.shape[-1]:
        m = torch.maximum(m, z_salient.max(-1, keepdim=True).values)
    m = m.masked_fill(m == float("-inf"), 0.0)  # a padded query may have no key
    p_window, p_salient = (z_window - m).exp_(), (z_salient - m).exp_()
    del z_window, z_salient  # free the logits before the products (a block's largest tensors)
    num = torch.einsum("bnkgrc,bnckd->bnrkgd", p_window.view(B, n, Hkv, G, C, 2 * C), vw).flatten(3, 4)
    num = num + torch.einsum("bnhrs,bshd->bnrhd", p_salient, vs)
    return num, (p_window.sum(-1) + p_salient.sum(-1)).transpose(2, 3)


def chunk_still_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gate: torch.Tensor,
    salient: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    softcap: float | None = None,
    key_valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_logits: int = 1 << 20,
) -> torch.Tensor:
    """STILL attention with all query chunks of a block in one batched computation.

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, Dv]`.
        q_feat: query features `[B, T, H, F]`, positive.
        k_feat: key features `[B, T, H, F]`, positive, per query head.
        gate: output gate of the linear numerator `[B, T, H, Dv]`.
        salient: `[B, T, H]` bool, keys kept exact once their chunk is two chunks behind the query's.
        chunk_size: C; chunk(j) = j // C.
        scale: logit multiplier, default D ** -0.5.
        softcap: if set, every softmax logit z becomes softcap * tanh(z / softcap) (Gemma 2).
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        eps: added to the denominator.
        block_logits: about the most softmax logits per batch row held at once; query chunks are taken in
            blocks that fit (memory and speed, not results, depend on it: 2^20 was the fastest of 2^19..2^22 on
            a CPU at 512 to 8192 tokens, and takes a quarter of the memory of 2^22).

    Returns:
        o `[B, T, H, Dv]` in q.dtype.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    scale = D**-0.5 if scale is None else scale
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    q, k, v, q_feat, k_feat, gate = (
        _pad_time(zero_invalid(x, key_valid, acc), pad) for x in (q, k, v, q_feat, k_feat, gate)
    )
    valid = F.pad(valid, (0, pad), value=False)
    salient = F.pad(salient, (0, 0, 0, pad), value=False) & valid[..., None]  # [B, N*C, H]
    # the linear part reads the valid non-salient keys; its temporaries are freed before the softmax part's
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_feat, k_feat, v, gate))
    linear_part = _linear_part if needs_grad or q.device.type != "cpu" else _linear_part_recurrent
    linear_num, linear_den = linear_part(q_feat, k_feat, v, gate, valid[..., None] & ~salient, C)

    # softmax part: chunk n reads chunks n - 1 and n whole, and the salient keys of chunks 0..n-2
    old = max(N - 2, 0) * C
    ks, vs, ks_mask = _salient_keys(k[:, :old], v[:, :old], salient[:, :old], C)  # [B, N - 2, s, H, *]
    s = ks.shape[2]
    ks, vs, ks_mask = ks.flatten(1, 2), vs.flatten(1, 2), ks_mask.flatten(1, 2)  # [B, S, H, *]
    key_chunk = torch.arange(ks.shape[1], device=q.device) // max(s, 1)  # [S]
    # a zero chunk in front gives chunk 0 a "previous chunk" whose keys are all invalid
    k_prev, v_prev = (F.pad(x, (0, 0, 0, 0, C, 0)).view(B, N + 1, C, Hkv, -1) for x in (k, v))
    kw, vw = (torch.cat([x[:, :-1], x[:, 1:]], dim=2) for x in (k_prev, v_prev))  # [B, N, 2C, Hkv, *]
    valid_prev = F.pad(valid, (C, 0), value=False).view(B, N + 1, C)
    valid_window = torch.cat([valid_prev[:, :-1], valid_prev[:, 1:]], dim=2)  # [B, N, 2C]
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(2 * C, device=q.device)[None, :]
    window_mask = (c <= r + C) & valid_window[:, :, None, :]  # [B, N, C, 2C]: key (c - C) <= query r
    q = q.view(B, N, C, H, D)
    per_chunk = H * C * (2 * C + ks.shape[1])
    step = max(1, block_logits // per_chunk)
    num, den = [], []
    for n0 in range(0, N, step):
        n1 = min(n0 + step, N)
        reads = key_chunk <= torch.arange(n0, n1, device=q.device)[:, None] - 2  # [n, S]
        reach = max(n1 - 2, 0) * s  # salient keys the block's last chunk reads
        block_mask = reads[None, :, :reach, None] & ks_mask[:, None, :reach]  # [B, n, S, H]
        block_num, block_den = _softmax_part(
            q[:, n0:n1],
            kw[:, n0:n1],
            vw[:, n0:n1],
            window_mask[:, n0:n1],
            ks[:, :reach],
            vs[:, :reach],
            block_mask,
            scale,
            softcap,
        )
        num.append(block_num)
        den.append(block_den)
    num = torch.cat(num, dim=1) + linear_num
    den = torch.cat(den, dim=1) + linear_den
    return (num / (den + eps)[..., None]).flatten(1, 2)[:, :T].to(dtype)
