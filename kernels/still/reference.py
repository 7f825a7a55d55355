"""STILL oracles, written to be obviously correct: full [T, T] masks in float64 for the sequence ops, and the
decode step row by row and head by head in fp32.

Also holds what every path shares: the input checks, the zeroing of invalid positions, the smoothed-KL formula
of the self-saliency score (docs/methods.md §3.2) and the decode cache (`StillDecodeState`).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

SALIENCY_EPS = 1e-8  # the epsilon of the official smoothing


def _expect(name: str, x: torch.Tensor, shape: tuple, dims: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"expected {name} {dims} = {tuple(shape)}, got {tuple(x.shape)}")


def check_qk(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    """Raise a ValueError unless q is `[B, T, H, D]`, k `[B, T, Hkv, D]` with H % Hkv == 0 and key_valid `[B, T]`."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B, T, H, D] and k [B, T, Hkv, D], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"expected H a multiple of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    _expect("k", k, (B, T, Hkv, D), "[B, T, Hkv, D]")
    if key_valid is not None:
        _expect("key_valid", key_valid, (B, T), "[B, T]")


def check_saliency_inputs(q, k, window, key_valid=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `self_saliency`."""
    check_qk(q, k, key_valid)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def check_inputs(q, k, v, q_feat, k_feat, gate, salient, chunk_size, key_valid=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `still_attention`."""
    check_qk(q, k, key_valid)
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    if v.dim() != 4 or q_feat.dim() != 4:
        raise ValueError(f"expected v and q_feat 4-d, got v {tuple(v.shape)}, q_feat {tuple(q_feat.shape)}")
    Dv, F = v.shape[-1], q_feat.shape[-1]
    _expect("v", v, (B, T, Hkv, Dv), "[B, T, Hkv, Dv]")
    _expect("q_feat", q_feat, (B, T, H, F), "[B, T, H, F]")
    _expect("k_feat", k_feat, (B, T, H, F), "[B, T, H, F]")
    _expect("gate", gate, (B, T, H, Dv), "[B, T, H, Dv]")
    _expect("salient", salient, (B, T, H), "[B, T, H]")
    if salient.dtype != torch.bool:
        raise ValueError(f"expected salient of dtype torch.bool, got {salient.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def zero_invalid(x: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`x` `[B, T, ...]` cast to dtype, zero at invalid positions.

    Padding may hold anything (NaN included); zeroing it keeps it out of every product, in both the forward
    and the backward pass, where masking the products alone would still let 0 * NaN through.
    """
    x = x.to(dtype)
    if key_valid is None:
        return x
    return x.masked_fill(~key_valid.view(*key_valid.shape, *[1] * (x.dim() - 2)), 0.0)


def _masked_softmax(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of z over the last dim where mask is True; zeros for a row without any True."""
    p = z.masked_fill(~mask, float("-inf")).softmax(-1)
    return p.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN


def smoothed_self_kl(z: torch.Tensor, in_window: torch.Tensor, is_self: torch.Tensor, window: int) -> torch.Tensor:
    """Self-saliency score: smoothed KL between the window softmax with and without the query's own key.

    Args:
        z: logits `[..., K]` of one query against K candidate keys.
        in_window: `[..., K]` bool (broadcastable), the keys of the query's window W_t.
        is_self: `[..., K]` bool (broadcastable), the query's own key (the true self slot).
        window: l, the nominal window length, used as the constant even when W_t is shorter.

    Returns:
        Scores `[...]`, summed over the keys in the window only.
    """
    eps = SALIENCY_EPS
    diag = (_masked_softmax(z, in_window) + eps) / (1 + window * eps)
    nodiag = (_masked_softmax(z, in_window & ~is_self) + eps) / (1 + window * eps + 1 / window)
    # the removed self term gets the uniform mass 1/l (quirk Q1 fixed: the true self slot, in every path)
    nodiag = nodiag.masked_fill(is_self, 1 / window + eps)
    return torch.where(in_window, diag * torch.log(diag / (nodiag + eps)), 0.0).sum(-1)


@torch.no_grad()
def naive_self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-saliency score of every token over its window of the last `window` valid keys (itself included).

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        window: l, keys the window reaches back, counting the token itself.
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.

    Returns:
        Detached fp32 scores `[B, T, H]`, -inf at invalid positions.
    """
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    q, k = (zero_invalid(x, key_valid, torch.float64) for x in (q, k))
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    z = torch.einsum("bthd,bjhd->bhtj", q, k) * scale  # [B, H, T, T]
    t = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= t) & (j > t - window) & valid[:, None, None, :]  # [B, 1, T, T]
    scores = smoothed_self_kl(z, in_window, j == t, window)  # [B, H, T]
    return scores.masked_fill(~valid[:, None], float("-inf")).transpose(1, 2).float()


def still_masks(salient: torch.Tensor, chunk_size: int, key_valid: torch.Tensor | None):
    """Which keys each query reads exactly (softmax) and which through the linear state.

    Args:
        salient: `[B, T, H]` bool.
        chunk_size: C; chunk(j) = j // C.
        key_valid: `[B, T]` bool or None.

    Returns:
        soft, lin: `[B, H, T, T]` bool over (query t, key j); disjoint, and together every valid j <= t.
    """
    B, T, H = salient.shape
    t = torch.arange(T, device=salient.device)[:, None]
    j = torch.arange(T, device=salient.device)[None, :]
    causal = (j <= t).expand(B, 1, T, T)
    if key_valid is not None:
        causal = causal & key_valid[:, None, None, :]
    recent = j // chunk_size >= t // chunk_size - 1  # the key's chunk is the query's or the one before
    kept = recent | salient.transpose(1, 2)[:, :, None, :]  # [B, H, T, T]
    return causal & kept, causal & ~kept


def naive_still_attention(
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
) -> torch.Tensor:
    """STILL hybrid attention: exact softmax over the salient and recent keys, gated linear attention over the rest.

    o_t = (sum_S e^(z_tj - m_t) v_j + gate_t * sum_N (q_feat_t . k_feat_j) v_j)
          / (sum_S e^(z_tj - m_t) + sum_N q_feat_t . k_feat_j + eps),  m_t = max_S z_tj  (see `still_masks`),
    z_tj = scale q_t . k_j, capped to softcap * tanh(z_tj / softcap) when softcap is set.

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

    Returns:
        o `[B, T, H, Dv]` in q.dtype.
    """
    D = q.shape[-1]
    group = q.shape[2] // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, q_feat, k_feat, gate = (zero_invalid(x, key_valid, torch.float64) for x in (q, k, v, q_feat, k_feat, gate))
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    soft, lin = still_masks(salient, chunk_size, key_valid)  # [B, H, T, T]

    z = torch.einsum("bthd,bjhd->bhtj", q, k) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.masked_fill(~soft, float("-inf"))
    m = z.amax(-1, keepdim=True)
    p = torch.exp(z - m.masked_fill(m == float("-inf"), 0.0))  # a padded query may have no key
    w = torch.einsum("bthf,bjhf->bhtj", q_feat, k_feat).masked_fill(~lin, 0.0)

    num = torch.einsum("bhtj,bjhd->bthd", p, v) + gate * torch.einsum("bhtj,bjhd->bthd", w, v)
    den = (p.sum(-1) + w.sum(-1)).transpose(1, 2)  # [B, T, H]
    return (num / (den + eps)[..., None]).to(dtype)


class StillDecodeState(NamedTuple):
    """What STILL decoding keeps per layer (docs/methods.md §3.6): a ring of the last two chunks, the queries of the
    newest chunk, the salient keys/values of older chunks per query head, the linear state, and each row's count of
    real tokens.

    A token of rank r (its index among its row's real tokens) sits in ring slot r % 2C and its query in `chunk_q`
    slot r % C; a ring slot is valid while it holds a token of the row's last two chunks. A chunk's scores are
    written when it is complete (the step that opens the next chunk), from `chunk_q`; until then its slots of
    `ring_score` hold what the prefill left, if anything. `salient_valid` is False for the slots a row has not
    filled (a chunk folded in another row only). Ring keys/values and queries are in the model dtype, scores, state
    and normalizer fp32.
    """

    ring_k: torch.Tensor  # [B, 2C, Hkv, D]
    ring_v: torch.Tensor  # [B, 2C, Hkv, Dv]
    ring_score: torch.Tensor  # [B, 2C, H]: each token's self-saliency score
    ring_valid: torch.Tensor  # [B, 2C] bool
    chunk_q: torch.Tensor  # [B, C, H, D]: the queries of the row's newest chunk
    salient_k: torch.Tensor  # [B, H, S, D]
    salient_v: torch.Tensor  # [B, H, S, Dv]
    salient_valid: torch.Tensor  # [B, S] bool
    state: torch.Tensor  # [B, H, F, Dv]: sum of k_feat v^T over the folded, non-salient tokens
    normalizer: torch.Tensor  # [B, H, F]: sum of their k_feat
    real_tokens: torch.Tensor  # [B] long


def check_decode_inputs(q, k, v, q_feat, gate, valid, cache: StillDecodeState, chunk_size: int, topk: int) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `still_decode`."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q_feat.dim() != 3:
        raise ValueError(
            f"expected q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv] and q_feat [B, H, F], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, q_feat {tuple(q_feat.shape)}"
        )
    (B, H, D), Hkv, Dv, F = q.shape, k.shape[1], v.shape[2], q_feat.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"expected H a multiple of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if chunk_size < 1 or not 1 <= topk <= chunk_size:
        raise ValueError(f"expected chunk_size >= 1 and 1 <= topk <= chunk_size, got {chunk_size} and {topk}")
    C2, S = 2 * chunk_size, cache.salient_k.shape[2] if cache.salient_k.dim() == 4 else 0
    for name, x, shape, dims in (
        ("k", k, (B, Hkv, D), "[B, Hkv, D]"),
        ("v", v, (B, Hkv, Dv), "[B, Hkv, Dv]"),
        ("q_feat", q_feat, (B, H, F), "[B, H, F]"),
        ("gate", gate, (B, H, Dv), "[B, H, Dv]"),
        ("valid", valid, (B,), "[B]"),
        ("ring_k", cache.ring_k, (B, C2, Hkv, D), "[B, 2C, Hkv, D]"),
        ("ring_v", cache.ring_v, (B, C2, Hkv, Dv), "[B, 2C, Hkv, Dv]"),
        ("ring_score", cache.ring_score, (B, C2, H), "[B, 2C, H]"),
        ("ring_valid", cache.ring_valid, (B, C2), "[B, 2C]"),
        ("chunk_q", cache.chunk_q, (B, chunk_size, H, D), "[B, C, H, D]"),
        ("salient_k", cache.salient_k, (B, H, S, D), "[B, H, S, D]"),
        ("salient_v", cache.salient_v, (B, H, S, Dv), "[B, H, S, Dv]"),
        ("salient_valid", cache.salient_valid, (B, S), "[B, S]"),
        ("state", cache.state, (B, H, F, Dv), "[B, H, F, Dv]"),
        ("normalizer", cache.normalizer, (B, H, F), "[B, H, F]"),
        ("real_tokens", cache.real_tokens, (B,), "[B]"),
    ):
        _expect(name, x, shape, dims)
    for name, x in (("valid", valid), ("ring_valid", cache.ring_valid), ("salient_valid", cache.salient_valid)):
        if x.dtype != torch.bool:
            raise ValueError(f"expected {name} of dtype torch.bool, got {x.dtype}")


@torch.no_grad()
def naive_still_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    gate: torch.Tensor,
    valid: torch.Tensor,
    cache: StillDecodeState,
    k_features: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 64,
    topk: int = 4,
    scale: float | None = None,
    softcap: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, StillDecodeState]:
    """One STILL decode step, row by row and head by head in fp32 (docs/methods.md §3.6).

    For a row whose token has rank r (valid): when r opens chunk c = r // C with c >= 1, chunk c - 1 (ranks
    r - C .. r - 1) is complete and is scored first: each of its tokens t, per head, gets the smoothed self-KL
    (`smoothed_self_kl`, window C) of its query's logits over the valid ring tokens of ranks t - C + 1 .. t. Then,
    with c >= 2, chunk c - 2 (ranks r - 2C .. r - C - 1) leaves the ring: per head, its `topk` highest-scored tokens
    join the salient cache (in rank order), the others add k_feat v^T to the state and k_feat to the normalizer.
    The token is then written to ring slot r % 2C and its query to `chunk_q` slot r % C. Its output, per head, over
    the keys E of the salient cache and the ring:
        o = (sum_E e^(z_j - m) v_j + gate * state^T q_feat) / (sum_E e^(z_j - m) + q_feat . normalizer + eps),
    z_j = scale q . k_j, capped to softcap * tanh(z_j / softcap) when softcap is set (scores are not capped).
    A padding token (valid False) changes nothing in the cache; its output is computed all the same.

    Args:
        q: RoPE'd query of the new token `[B, H, D]`.
        k: its RoPE'd key `[B, Hkv, D]`; query head h reads kv head h // (H // Hkv).
        v: its value `[B, Hkv, Dv]`.
        q_feat: its query features `[B, H, F]` (NP-Map), positive.
        gate: its output gate of the linear numerator `[B, H, Dv]`.
        valid: `[B]` bool, False where the token is padding.
        cache: the layer's `StillDecodeState` before this token (not modified).
        k_features: the key feature map: GQA-expanded keys `[B, C, H, D]` -> positive features `[B, C, H, F]`.
        chunk_size: C.
        topk: tokens of a chunk kept exact per head (1 <= topk <= C).
        scale: logit multiplier, default D ** -0.5.
        softcap: if set, every softmax logit z becomes softcap * tanh(z / softcap) (Gemma 2).
        eps: added to the denominator.

    Returns:
        o `[B, H, Dv]` in q.dtype, and the cache after this token. When any row folds a chunk, every row's
        salient cache grows by `topk` slots, valid only in the rows that folded.
    """
    B, H, D = q.shape
    group = H // k.shape[1]
    C = chunk_size
    scale = D**-0.5 if scale is None else scale
    ring_k, ring_v, ring_score, ring_valid, chunk_q = (x.clone() for x in cache[:5])
    state, normalizer = cache.state.float().clone(), cache.normalizer.float().clone()
    rank = cache.real_tokens
    completes = valid & (rank % C == 0) & (rank >= C)
    folds = completes & (rank >= 2 * C)
    added = topk if folds.any() else 0
    new_k = cache.salient_k.new_zeros(B, H, added, D)
    new_v = cache.salient_v.new_zeros(B, H, added, v.shape[-1])
    o = torch.zeros(B, H, v.shape[-1], device=q.device)
    for b in range(B):
        r = int(rank[b])
        if completes[b]:
            ranks = [r - 1 - (r - 1 - s) % (2 * C) for s in range(2 * C)]  # of the token in each ring slot
            for t in range(r - C, r):  # chunk c - 1, scored before chunk c - 2 leaves the ring with its keys
                slot = t % (2 * C)
                window = [s for s in range(2 * C) if ring_valid[b, s] and t - C < ranks[s] <= t]
                for h in range(H):
                    z = ring_k[b, window, h // group].float() @ chunk_q[b, t % C, h].float() * scale
                    is_self = torch.tensor([s == slot for s in window], device=q.device)
                    ring_score[b, slot, h] = smoothed_self_kl(z, torch.ones_like(is_self), is_self, C)
        if folds[b]:
            slots = [(r - 2 * C + i) % (2 * C) for i in range(C)]  # chunk c - 2, in rank order
            features = k_features(ring_k[b, slots].repeat_interleave(group, dim=1)[None])[0].float()  # [C, H, F]
            for h in range(H):
                top = sorted(ring_score[b, slots, h].float().topk(topk).indices.tolist())
                for i, j in enumerate(top):
                    new_k[b, h, i], new_v[b, h, i] = ring_k[b, slots[j], h // group], ring_v[b, slots[j], h // group]
                for j in (j for j in range(C) if j not in top):  # the rest fold into the state
                    state[b, h] += torch.outer(features[j, h], ring_v[b, slots[j], h // group].float())
                    normalizer[b, h] += features[j, h]
            ring_valid[b, slots] = False
        if valid[b]:
            slot = r % (2 * C)
            ring_k[b, slot], ring_v[b, slot], ring_valid[b, slot] = k[b], v[b], True
            chunk_q[b, r % C] = q[b]
        salient = torch.cat([cache.salient_valid[b], folds[b].expand(added)])
        salient_k = torch.cat([cache.salient_k[b], new_k[b]], dim=1)[:, salient]  # [H, n, D]
        salient_v = torch.cat([cache.salient_v[b], new_v[b]], dim=1)[:, salient]
        for h in range(H):
            keys = torch.cat([salient_k[h], ring_k[b, ring_valid[b], h // group]]).float()  # [n, D]
            values = torch.cat([salient_v[h], ring_v[b, ring_valid[b], h // group]]).float()
            z = keys @ q[b, h].float() * scale  # [n]
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            exact = (z - z.max()).exp() if len(z) else z  # a padding row may have no key
            linear = q_feat[b, h].float()
            numerator = exact @ values + gate[b, h].float() * (state[b, h].T @ linear)
            o[b, h] = numerator / (exact.sum() + linear @ normalizer[b, h] + eps)
    salient_valid = torch.cat([cache.salient_valid, folds[:, None].expand(-1, added)], dim=1)
    new = StillDecodeState(
        ring_k, ring_v, ring_score, ring_valid, chunk_q, torch.cat([cache.salient_k, new_k], dim=2),
        torch.cat([cache.salient_v, new_v], dim=2), salient_valid, state, normalizer, rank + valid.long(),
    )  # fmt: skip
    return o.to(device=q.device, dtype=q.dtype), new
