"""STILL's decode step in PyTorch, all rows and heads at once: one new token per row against the cache that the
prefill or earlier steps left (docs/methods.md §3.6). The "torch" path of `still_decode`, and the "triton" one with
the Triton top-k selection of a folded chunk: the step itself has no kernel.

The cache is updated in place, so a step costs the same at every context: the new token goes into its ring slot
and its query into the newest chunk's, a folded chunk into the state and into salient buffers that grow
geometrically (`append_along`). A chunk is scored once, when it is complete, all its tokens in one product: the
per-token score it replaces was about a fifth of a step's attention on CPU (docs/inference-speed.md). On a CPU a
step costs about as many microseconds as it has operations, so the attention reads the ring per KV head and sums
the ring, the salient cache and the state apart, with no repeated or joined copies."""

from collections.abc import Callable

import torch

from ..common.buffers import append_along
from ..common.masks import all_valid_known
from .reference import StillDecodeState, smoothed_self_kl
from .selection import torch_select_salient


def torch_still_decode(
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
    select: Callable[[torch.Tensor, int, int], torch.Tensor] = torch_select_salient,
) -> tuple[torch.Tensor, StillDecodeState]:
    """One STILL decode step; arguments and returns as in `naive_still_decode`, plus `select`, the top-k selection
    `(scores [B, C, H], chunk_size, topk) -> salient [B, C, H]` of the chunk leaving the ring. The cache is updated
    in place and returned (its salient tensors may be new views): keep only the returned one."""
    C = chunk_size
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rank = cache.real_tokens  # [B]: this token's index among its row's real tokens
    completes = valid & (rank % C == 0) & (rank >= C)  # chunk c - 1 is complete: score it
    if completes.any():
        _score_finished_chunk(cache, completes, C, groups, scale)
        opens_chunk = completes & (rank >= 2 * C)
        if opens_chunk.any():
            cache = _fold_oldest_chunk(cache, opens_chunk, k_features, C, topk, groups, select)
    slot = rank % (2 * C)
    # rows of padding keep their slots; a step known to have none writes without reading
    rows = None if all_valid_known(valid) else valid
    for ring, x in ((cache.ring_k, k), (cache.ring_v, v), (cache.ring_valid, valid)):
        _write_slot(ring, slot, x, rows)
    _write_slot(cache.chunk_q, rank % C, q, rows)

    # softmax over the salient cache and the ring, gated linear attention over the state, one normalizer; the ring
    # is read per KV head (its G query heads as rows), so nothing is repeated or joined
    B, H, D = q.shape
    query = q.float()[:, :, None]  # [B, H, 1, D]
    ring_k, ring_v = (x.float().transpose(1, 2) for x in (cache.ring_k, cache.ring_v))  # [B, Hkv, 2C, D]
    z_ring = (query.view(B, -1, groups, D) @ ring_k.mT).view(B, H, 1, 2 * C) * scale
    z_salient = (query @ cache.salient_k.float().mT) * scale  # [B, H, 1, S]
    if softcap is not None:
        z_ring, z_salient = (softcap * torch.tanh(z / softcap) for z in (z_ring, z_salient))
    z_ring.masked_fill_(~cache.ring_valid[:, None, None], float("-inf"))
    z_salient.masked_fill_(~cache.salient_valid[:, None, None], float("-inf"))
    shift = z_ring.amax(-1, keepdim=True)
    if z_salient.shape[-1]:
        shift = torch.maximum(shift, z_salient.amax(-1, keepdim=True))
    shift = shift.clamp_min_(torch.finfo(torch.float32).min)  # a padding row has no key
    w_ring, w_salient = z_ring.sub_(shift).exp_(), z_salient.sub_(shift).exp_()
    q_feat = q_feat.float()[:, :, None]  # [B, H, 1, F]
    numerator = (w_ring.view(B, -1, groups, 2 * C) @ ring_v).view(B, H, 1, -1) + w_salient @ cache.salient_v.float()
    numerator += gate.float()[:, :, None] * (q_feat @ cache.state)
    denominator = w_ring.sum(-1, keepdim=True) + w_salient.sum(-1, keepdim=True) + q_feat @ cache.normalizer[..., None]
    o = (numerator / denominator.add_(eps)).view(B, H, -1)  # [B, H, Dv]
    cache.real_tokens.add_(valid.long())
    return o.to(q.dtype), cache


def _write_slot(ring: torch.Tensor, slot: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Write x [B, ...] into ring slot `slot` [B] in place, in the rows where `valid` (None: all rows); other rows
    keep the slot."""
    index = slot.view(-1, 1, *[1] * (ring.dim() - 2)).expand(-1, 1, *ring.shape[2:])
    x = x[:, None].to(ring.dtype)
    if valid is not None:
        x = torch.where(valid.view(-1, 1, *[1] * (ring.dim() - 2)), x, ring.gather(1, index))
    ring.scatter_(1, index, x)


def _ring_ranks(rank: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The rank of the token in every ring slot `[B, 2C]`, for a row whose newest token has rank `rank`."""
    span = 2 * chunk_size
    slots = torch.arange(span, device=rank.device)
    return rank[:, None] - (rank[:, None] - slots[None]) % span


def _score_finished_chunk(cache: StillDecodeState, rows, chunk_size, groups, scale) -> None:
    """For `rows` (about to write chunk c's first token), write the scores of chunk c - 1, now complete: each of
    its tokens t against the valid ring keys of ranks t - C + 1 .. t, the uncapped logits of its stored query."""
    C = chunk_size
    rank = cache.real_tokens
    B, _, H, D = cache.chunk_q.shape
    token_rank = rank[:, None] - C + torch.arange(C, device=rank.device)  # [B, C]
    lag = token_rank[:, :, None] - _ring_ranks(rank - 1, C)[:, None]  # [B, C, 2C]: query rank minus key rank
    in_window = cache.ring_valid[:, None] & (lag >= 0) & (lag < C)
    queries = cache.chunk_q.float().view(B, C, -1, groups, D)  # [B, C, Hkv, G, D]
    z = torch.einsum("bckgd,bskd->bkgcs", queries, cache.ring_k.float()).reshape(B, H, C, 2 * C) * scale
    scores = smoothed_self_kl(z, in_window[:, None], (lag == 0)[:, None], C).transpose(1, 2)  # [B, C, H]
    start = ((rank // C - 1) % 2) * C  # chunk c - 1's first ring slot
    index = (start[:, None] + torch.arange(C, device=rank.device))[..., None].expand(-1, -1, H)  # [B, C, H]
    old = cache.ring_score.gather(1, index)
    cache.ring_score.scatter_(1, index, torch.where(rows[:, None, None], scores, old))


def _fold_oldest_chunk(cache: StillDecodeState, rows, k_features, chunk_size, topk, groups, select):
    """For `rows` (about to write chunk c's first token), move chunk c - 2 out of the ring: its top-k tokens per
    head join the salient cache, the others fold into the linear state."""
    C = chunk_size
    rank = cache.real_tokens
    start = ((rank // C) % 2) * C  # [B]: chunk c - 2 sits where chunk c will
    index = start[:, None] + torch.arange(C, device=rank.device)[None]  # [B, C]

    def take(x):
        return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

    k, v, scores = take(cache.ring_k), take(cache.ring_v), take(cache.ring_score)  # [B, C, ...]
    salient = select(scores, C, topk) & rows[:, None, None]  # [B, C, H]
    k_heads = k.repeat_interleave(groups, dim=2)  # [B, C, H, D]
    v_heads = v.repeat_interleave(groups, dim=2)
    chosen = torch.argsort((~salient).to(torch.uint8), dim=1, stable=True)[:, :topk]  # [B, topk, H]

    def gather(x):
        return x.gather(1, chosen[..., None].expand(-1, -1, -1, x.shape[-1])).transpose(1, 2)  # [B, H, topk, .]

    linear = (~salient & rows[:, None, None]).float()  # [B, C, H]
    weighted = k_features(k_heads).float() * linear[..., None]  # [B, C, H, F]
    cleared = torch.zeros_like(cache.ring_valid).scatter(1, index, rows[:, None].expand(-1, C))
    cache.state.add_(torch.einsum("bchf,bchd->bhfd", weighted, v_heads.float()))
    cache.normalizer.add_(weighted.sum(1))
    cache.ring_valid.logical_and_(~cleared)
    return cache._replace(
        salient_k=append_along(cache.salient_k, gather(k_heads), 2),
        salient_v=append_along(cache.salient_v, gather(v_heads), 2),
        salient_valid=append_along(cache.salient_valid, rows[:, None].expand(-1, topk), 1),
    )
