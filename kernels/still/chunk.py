"""Blockwise STILL in PyTorch: no [T, T] matrix, differentiable through autograd.

Self-saliency: every block of queries is scored against the keys its window reaches (overlapping views of the
padded key sequence), all blocks in one batched computation, so the cost is linear in T.

Attention: a loop over query chunks. Chunk c reads exactly its own keys, all keys of chunk c - 1 and the salient
keys of chunks 0..c-2, i.e. at most [B, H, C, 2C + salient so far] logits. The non-salient keys of a chunk enter
a running linear state ([B, H, F, Dv] and normalizer [B, H, F]) once the chunk is two chunks behind the query's.
"""

import torch
import torch.nn.functional as F

from .reference import smoothed_self_kl, zero_invalid


@torch.no_grad()
def chunk_self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Self-saliency score of every token over its window of the last `window` valid keys (itself included).

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        window: l, keys the window reaches back, counting the token itself.
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        block_size: queries per block.

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
    q = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, N, Bq, Hkv, H // Hkv, D)
    k = F.pad(k, (0, 0, 0, 0, window - 1, pad)).unfold(1, W, Bq)  # [B, N, Hkv, D, W]
    keys_valid = F.pad(valid, (window - 1, pad), value=False).unfold(1, W, Bq)  # [B, N, W]

    z = torch.einsum("bnrkgd,bnkdc->bnkgrc", q, k).flatten(2, 3) * scale  # [B, N, H, Bq, W]
    r = torch.arange(Bq, device=q.device)[:, None]
    c = torch.arange(W, device=q.device)[None, :]
    in_window = (c >= r) & (c < r + window) & keys_valid[:, :, None, None, :]  # [B, N, 1, Bq, W]
    scores = smoothed_self_kl(z, in_window, c == r + window - 1, window)  # [B, N, H, Bq]
    scores = scores.transpose(2, 3).reshape(B, N * Bq, H)[:, :T]
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


def _chunk_softmax(q, k, v, keys_valid, ks, vs, ks_mask, scale):
    """Unnormalised softmax part of one query chunk: sum_S e^(z - m) v and sum_S e^(z - m).

    Args:
        q: queries of the chunk `[B, C, H, D]`.
        k: keys of the previous and this chunk `[B, 2C, Hkv, D]`.
        v: their values `[B, 2C, Hkv, Dv]`.
        keys_valid: `[B, 2C]` bool.
        ks: salient keys of the older chunks `[B, S, H, D]`.
        vs: their values `[B, S, H, Dv]`.
        ks_mask: `[B, S, H]` bool, which salient slots hold a key.
        scale: logit multiplier.

    Returns:
        num `[B, C, H, Dv]`, den `[B, C, H]`.
    """
    B, C, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(2 * C, device=q.device)[None, :]
    local_mask = (c <= r + C) & keys_valid[:, None, None, :]  # [B, 1, C, 2C]: key (c - C) <= query r
    z_local = torch.einsum("brkgd,bckd->bkgrc", q.view(B, C, Hkv, G, D), k).flatten(1, 2) * scale
    z_sal = torch.einsum("brhd,bshd->bhrs", q, ks) * scale  # [B, H, C, S]
    z_sal = z_sal.masked_fill(~ks_mask.transpose(1, 2)[:, :, None, :], float("-inf"))
    z = torch.cat([z_sal, z_local.masked_fill(~local_mask, float("-inf"))], dim=-1)  # [B, H, C, S + 2C]
    m = z.amax(-1, keepdim=True)
    p = torch.exp(z - m.masked_fill(m == float("-inf"), 0.0))  # a padded query may have no key
    p_sal, p_local = p.split([ks.shape[1], 2 * C], dim=-1)
    num = torch.einsum("bhrs,bshd->brhd", p_sal, vs)
    num = num + torch.einsum("bkgrc,bckd->brkgd", p_local.view(B, Hkv, G, C, 2 * C), v).flatten(2, 3)
    return num, p.sum(-1).transpose(1, 2)


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
    key_valid: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """STILL hybrid attention: exact softmax over the salient and recent keys, gated linear attention over the rest.

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
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        eps: added to the denominator.

    Returns:
        o `[B, T, H, Dv]` in q.dtype.
    """
    B, T, H, D = q.shape
    Hkv, Dv, Fd = k.shape[2], v.shape[-1], q_feat.shape[-1]
    G = H // Hkv
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    scale = D**-0.5 if scale is None else scale
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    q, k, v, q_feat, k_feat, gate = (
        F.pad(zero_invalid(x, key_valid, acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, q_feat, k_feat, gate)
    )
    valid = F.pad(valid, (0, pad), value=False)
    salient = F.pad(salient, (0, 0, 0, pad), value=False) & valid[..., None]  # [B, N*C, H]
    # the linear part reads the valid non-salient keys; zeroing the others keeps them out of the state
    k_feat = k_feat.masked_fill(~(valid[..., None] & ~salient)[..., None], 0.0)

    # only chunks 0..N-3 are ever two chunks behind a query
    old = max(N - 2, 0) * C
    ks, vs, ks_mask = _salient_keys(k[:, :old], v[:, :old], salient[:, :old], C)  # [B, N - 2, s, H, *]
    # a zero chunk in front gives chunk 0 a "previous chunk" whose keys are all invalid
    k_prev, v_prev = (F.pad(x, (0, 0, 0, 0, C, 0)) for x in (k, v))
    valid_prev = F.pad(valid, (C, 0), value=False)

    state = q.new_zeros(B, Hkv, G, Fd, Dv)
    norm = q.new_zeros(B, H, Fd)
    out = []
    for n in range(N):
        if n >= 2:  # chunk n - 2 leaves the exact window: its non-salient keys join the state
            kf = k_feat[:, (n - 2) * C : (n - 1) * C]  # [B, C, H, F]
            vc = v[:, (n - 2) * C : (n - 1) * C]
            state = state + torch.einsum("bckgf,bckd->bkgfd", kf.view(B, C, Hkv, G, Fd), vc)
            norm = norm + kf.sum(1)
        now, window = slice(n * C, (n + 1) * C), slice(n * C, (n + 2) * C)
        n_old = max(n - 1, 0)  # chunks whose salient keys chunk n reads exactly
        num, den = _chunk_softmax(
            q[:, now],
            k_prev[:, window],
            v_prev[:, window],
            valid_prev[:, window],
            ks[:, :n_old].flatten(1, 2),
            vs[:, :n_old].flatten(1, 2),
            ks_mask[:, :n_old].flatten(1, 2),
            scale,
        )
        qf = q_feat[:, now]  # [B, C, H, F]
        num = num + gate[:, now] * torch.einsum("bchf,bhfd->bchd", qf, state.flatten(1, 2))
        den = den + torch.einsum("bchf,bhf->bch", qf, norm)
        out.append(num / (den + eps)[..., None])
    return torch.cat(out, dim=1)[:, :T].to(dtype)
