"""Training-free baseline: softmax attention over attention sinks plus a sliding window (StreamingLLM,
https://arxiv.org/abs/2309.17453; docs/methods.md §5).

Each query sees the first `sinks` real tokens of its sequence and the most recent `window - sinks` tokens
(itself included), so every query attends to at most `window` keys and the cache has a constant size: the
sink keys plus a ring of the previous `window - sinks - 1` tokens. Keys keep their original RoPE positions.
No parameter changes: this is the pretrained attention with a restricted mask, the bar every linearized
method must clear.
"""

from __future__ import annotations

import torch

from ..cache_layers import RecentTokens, StateCacheLayer
from ..kernels import sliding_window_attention
from ..methods import SinkWindowSettings
from .base import LinearizedAttention


class SinkWindowCacheLayer(StateCacheLayer):
    """The sinks and the recent tokens in one storage per tensor (keys, values [B, sinks + 1 + recent, Hkv, D],
    validity and rank [B, sinks + 1 + recent]): the sink slots first, the last of them a spare that takes the writes
    of non-sinks, then the ring (`RecentTokens` with the sink slots reserved). One storage lets a decode step attend
    to all of it at once. Also how many real tokens each row has seen."""

    _tensor_fields = ("recent", "real_tokens")

    def __init__(self, recent: int, sinks: int):
        super().__init__()
        self.recent = RecentTokens(recent - 1, reserved=sinks + 1 if sinks else 0)
        self.sinks = sinks
        self.real_tokens = None
        # no token that leaves the window from now on is a sink: every row has seen enough real tokens
        self.sinks_settled = False

    def keep_sinks(self, keys, values, valid, rank) -> None:
        """Store evicted tokens that are sinks (real tokens of rank < sinks) in their sink slot, in place."""
        sink_keys, sink_values, sink_valid, _ = self.recent.reserved_slots()
        is_sink = valid & (rank < self.sinks)
        slot = torch.where(is_sink, rank, torch.full_like(rank, self.sinks))  # [B, n]
        expanded = slot[:, :, None, None].expand_as(keys)
        sink_keys.scatter_(1, expanded, keys.to(sink_keys.dtype))
        sink_values.scatter_(1, expanded, values.to(sink_values.dtype))
        sink_valid.scatter_(1, slot, is_sink)

    def stored_sinks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The sink slots' keys, values [B, sinks, Hkv, D] and validity [B, sinks] (False until a sink left the
        window), or None before the first update."""
        if (reserved := self.recent.reserved_slots()) is None:
            return None
        return tuple(x[:, : self.sinks] for x in reserved[:3])

    def reset(self) -> None:
        super().reset()
        self.sinks_settled = False


class SinkWindowAttention(LinearizedAttention):
    def __init__(self, config, layer_idx, family):
        super().__init__(config, layer_idx, family)
        settings = config.layer_settings(layer_idx)
        self.sinks = settings.sinks
        self.recent = settings.window - self.sinks

    @staticmethod
    def cache_layer(settings: SinkWindowSettings) -> SinkWindowCacheLayer:
        return SinkWindowCacheLayer(settings.window - settings.sinks, settings.sinks)

    def attend(self, hidden_states, position_embeddings, state, valid):
        q, k, v, _ = self.project(hidden_states)
        q, k = self.rotate(q, k, position_embeddings)  # [B, T, H, D], [B, T, Hkv, D]
        o = sink_window_attention(
            q,
            k,
            v,
            valid,
            state,
            recent=self.recent,
            sinks=self.sinks,
            scale=self.scaling,
            softcap=self.softcap,
            backend=self.backend,
        )
        return o.flatten(2)

    @staticmethod
    def state_bytes(settings, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
        # the ring (the previous recent - 1 tokens and a spare) and the sink slots (and a spare), each with a key,
        # a value, a validity flag and a rank; and each row's count of real tokens
        recent = settings.window - settings.sinks
        slots = recent + (settings.sinks + 1 if settings.sinks else 0)
        return slots * (2 * kv_heads * head_dim * dtype_bytes + 1 + 8) + 8


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    state: SinkWindowCacheLayer | None,
    *,
    recent: int,
    sinks: int,
    scale: float,
    softcap: float | None = None,
    backend: str | None,
) -> torch.Tensor:
    """Softmax attention of each query over its row's first `sinks` real tokens and the last `recent` tokens
    (itself included), taking earlier tokens from `state` and adding the new ones to it.

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`.
        v: values `[B, T, Hkv, D]`.
        valid: `[B, T]` bool, False at padding, or None.
        state: the layer's cache, or None without one.
        recent, sinks: the window's two parts, in tokens.
        scale: the logits' scale (the source attention's).
        softcap: the logit cap (Gemma 2), or None.
        backend: a kernel backend, or None for LINEARIZE_BACKEND or the device's default (`resolve_backend`).

    Returns:
        `[B, T, H, D]` in q.dtype.
    """
    batch, length = q.shape[:2]
    valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if valid is None else valid
    if state is not None and length == 1 and state.real_tokens is not None:
        return _decode_step(q, k, v, valid, state, scale=scale, softcap=softcap, backend=backend)
    seen_real = torch.zeros(batch, dtype=torch.long, device=q.device)
    if state is not None and state.real_tokens is not None:
        seen_real = state.real_tokens
    rank = seen_real[:, None] + valid.long().cumsum(1) - 1  # [B, T]: index among the row's real tokens

    keys, values, key_valid, key_rank = k, v, valid, rank
    if state is not None:
        (keys, values, key_valid, key_rank), evicted = state.recent.update(k, v, valid, rank)

    sink_keys = sink_values = sink_mask = None
    if sinks:
        sink_keys, sink_values, sink_mask = _visible_sinks(
            state, keys, values, key_valid, key_rank, length, recent, sinks
        )
    o = sliding_window_attention(
        q,
        keys,
        values,
        window=recent,
        key_valid=key_valid,
        sink_k=sink_keys,
        sink_v=sink_values,
        sink_mask=sink_mask,
        scale=scale,
        softcap=softcap,
        backend=backend,
    )
    if state is not None:
        if sinks:
            state.keep_sinks(*evicted)
        state.real_tokens = seen_real + valid.long().sum(1)
    return o


def _decode_step(q, k, v, valid, state: SinkWindowCacheLayer, *, scale, softcap, backend) -> torch.Tensor:
    """One new token per row after a prefill: the new token takes its ring slot, and the query attends to the whole
    storage at once (the stored sinks and the ring, itself included; the validity masks the sink slots no sink has
    filled yet). A decode step costs about as many microseconds as it has operations on a CPU, so this is the
    general path of `sink_window_attention` with nothing it does not need: no sink keys joined on, and once every
    row has seen enough real tokens that no evicted token can be a sink, no sink bookkeeping."""
    rank = state.real_tokens[:, None]  # [B, 1]: the new token's index among its row's real tokens
    (keys, values, key_valid, _), evicted = state.recent.update(k, v, valid, rank)
    o = sliding_window_attention(
        q, keys, values, window=keys.shape[1], key_valid=key_valid, scale=scale, softcap=softcap, backend=backend
    )
    state.real_tokens = state.real_tokens + valid[:, 0]
    if state.sinks and not state.sinks_settled:
        state.keep_sinks(*evicted)
        if q.device.type == "cpu":  # on a GPU, reading the count would wait for the device
            # the ring keeps `capacity` tokens besides the new one, so the next evicted token's rank is at least
            # real_tokens - capacity
            state.sinks_settled = bool(state.real_tokens.min() >= state.sinks + state.recent.capacity)
    return o


def _visible_sinks(state, keys, values, key_valid, key_rank, length, recent, sinks):
    """Extra keys for the sink path and which query sees which [B, T, E].

    Sinks already evicted from the window live in the cache and are visible to every new query. Sinks still
    among `keys` are visible only to queries for which they have left the window, so no key counts twice.
    """
    total = keys.shape[1]
    found = [(key_rank == r) & key_valid for r in range(sinks)]  # each [B, S]
    index = torch.stack([f.int().argmax(1) for f in found], 1)  # [B, sinks]
    present = torch.stack([f.any(1) for f in found], 1)
    query_pos = torch.arange(total - length, total, device=keys.device)  # [T]
    left_window = query_pos[None, :, None] - index[:, None, :] >= recent  # [B, T, sinks]
    gather = index[:, :, None, None].expand(-1, -1, *keys.shape[2:])
    sink_keys, sink_values = keys.gather(1, gather), values.gather(1, gather)
    sink_mask = present[:, None, :] & left_window
    if state is not None and (stored := state.stored_sinks()) is not None:
        sink_keys = torch.cat([stored[0], sink_keys], 1)
        sink_values = torch.cat([stored[1], sink_values], 1)
        sink_mask = torch.cat([stored[2][:, None].expand(-1, length, -1), sink_mask], 2)
    return sink_keys, sink_values, sink_mask
