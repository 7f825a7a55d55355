"""Parallax: softmax attention plus a learned probe (Zuo et al., 2026, https://arxiv.org/abs/2605.29157;
docs/methods.md §4).

A query-shaped probe r = W_r x reweights the softmax average by a local linear estimate: with softmax weights p
over the causal keys and s = r . k (unscaled), o = sum_j p_j (1 + t_bar - s_j) v_j where t_bar = sum_j p_j s_j,
i.e. softmax attention minus the p-weighted covariance of v and k times r. The KV cache is the softmax cache;
r is recomputed every step and never cached. Decisions for converting a pretrained layer (no published work
does this):

- `r_proj` has q_proj's shape, no bias, and starts at zero, so the converted model computes exactly the source's
  outputs; the gradient at zero is non-zero (it is sum_i dr_i x_i^T), so the probe grows from there.
- `probe_rank` (optional, ours): r = r_proj(r_down(x)) through a rank bottleneck, r_down random and r_proj zero,
  as LoRA starts: far fewer parameters for a short fine-tune to fit, still exact at conversion.
- No norm on r, in every family: an RMSNorm at exactly zero input has a Jacobian of about gain / sqrt(eps) (x1000
  at eps 1e-6), which would blow up the first updates. For qk-norm families (Qwen3) the keys stay normed as the
  source has them; the learned W_r sets r's scale.
- r gets the same RoPE as q, so r . k sees the same relative positions as q . k.
- `window` (optional, ours): each query sees the last `window` keys, itself included, and the cache keeps only the
  previous `window - 1` tokens; without it the cache grows like the source's. A source layer with a window (Mistral
  7B v0.1, Phi-3-mini-4k, Gemma's local layers) keeps it, or the narrower `window`, so conversion stays exact.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from ..cache_layers import GrowingTokens, RecentTokens, StateCacheLayer
from ..kernels.parallax import parallax_attention, parallax_decode
from ..methods import ParallaxSettings
from .base import LinearizedAttention


class ParallaxCacheLayer(StateCacheLayer):
    """RoPE'd keys and values and which slots hold a real token [B, L]: with a window, a ring of the previous
    `window - 1` ([B, L, Hkv, D]); without one, all tokens so far, growing geometrically and stored head-major
    ([B, Hkv, L, D]), so that a decode step reads each head's keys and values as contiguous rows."""

    _tensor_fields = ("tokens",)

    def __init__(self, window: int | None):
        super().__init__()
        self.tokens = RecentTokens(window - 1) if window else GrowingTokens(time_dims=(2, 2, 1))

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Add the new tokens ([B, T, Hkv, D]); returns the keys and values ([B, P + T, Hkv, D], views of the
        storage) and validity [B, P + T] the new queries read: the cached ones and the new ones (in time order for
        several new tokens; a one-token step may get them in ring order)."""
        if isinstance(self.tokens, RecentTokens):
            return self.tokens.update(k, v, valid)[0]
        keys, values, valid = self.tokens.update(k.transpose(1, 2), v.transpose(1, 2), valid)
        return keys.transpose(1, 2), values.transpose(1, 2), valid


class ParallaxAttention(LinearizedAttention):
    def __init__(self, config, layer_idx, family):
        super().__init__(config, layer_idx, family)
        settings = config.layer_settings(layer_idx)
        self.window, rank = settings.window, settings.probe_rank
        self.r_down = nn.Linear(config.hidden_size, rank, bias=False) if rank else None  # None: r_proj reads x
        self.r_proj = nn.Linear(rank or config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.initializer_range = getattr(config, "initializer_range", 0.02)

    @staticmethod
    def cache_layer(settings: ParallaxSettings) -> ParallaxCacheLayer:
        return ParallaxCacheLayer(settings.window)

    def reset_parameters(self) -> None:
        """A zero probe where a folder lacks it (and in `from_config`): transformers' own initialisation would draw
        r_proj at random, and the model would no longer compute the source's attention. `from_pretrained` calls it
        through the model's `initialize_weights`; transformers' initialisation functions leave loaded tensors alone."""
        init.zeros_(self.r_proj.weight)

    def init_new_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        """A zero probe: the converted layer is the source's softmax attention exactly. A rank bottleneck's down
        projection starts random (seeded by the layer), so that the zero up projection gets a gradient."""
        self.r_proj.weight = nn.Parameter(torch.zeros_like(self.r_proj.weight, device=device, dtype=dtype))
        if self.r_down is not None:
            generator = torch.Generator().manual_seed(self.layer_idx)
            down = torch.randn(self.r_down.weight.shape, generator=generator) * self.initializer_range
            self.r_down.weight = nn.Parameter(down.to(device=device, dtype=dtype))

    def attend(self, hidden_states, position_embeddings, state, valid):
        batch, length, _ = hidden_states.shape
        q, k, v, _ = self.project(hidden_states)
        r = self.probe(hidden_states)
        qr, k = self.rotate(torch.cat([q, r], dim=2), k, position_embeddings)  # one rotation for q and r
        q, r = qr.split(self.num_heads, dim=2)  # [B, T, H, D] each
        options = {"scale": self.scaling, "softcap": self.softcap, "window": self.window, "backend": self.backend}
        if state is None:
            o = parallax_attention(q, r, k, v, key_valid=valid, **options)
        else:
            if valid is None:
                valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
            keys, values, key_valid = state.append(k, v, valid)  # [B, P + T, ...]: history, then these tokens
            past = keys.shape[1] - length
            if length == 1 and past:
                o = parallax_decode(q[:, 0], r[:, 0], keys, values, key_valid, **options)[:, None]
            else:
                history = {"past_k": keys[:, :past], "past_v": values[:, :past]} if past else {}
                o = parallax_attention(q, r, k, v, key_valid=key_valid, **history, **options)
        return o.flatten(2)

    def probe(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The probes r `[B, T, H, D]` of the layer input `[B, T, hidden]`, before RoPE."""
        x = hidden_states if self.r_down is None else self.r_down(hidden_states)
        return self.r_proj(x).view(*hidden_states.shape[:2], self.num_heads, self.head_dim)

    @staticmethod
    def state_bytes(settings, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
        window = settings.window
        slots = window if window else tokens  # a ring of the previous window - 1 and a spare slot, allocated at once
        return slots * (2 * kv_heads * head_dim * dtype_bytes + 1)
