"""What every converted attention layer shares: the source projections, RoPE and the padding mask."""

from __future__ import annotations

import torch
from torch import nn

from ..families import Family


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, H, D] and k [B, T, Hkv, D] with the model's rotary tables `cos`, `sin` [B, T, D]."""
    # one rotation over both: at decode, per-op overhead is most of the cost
    qk = torch.cat([q, k], dim=2)
    qk = qk * cos.unsqueeze(2) + rotate_half(qk) * sin.unsqueeze(2)
    return qk.split([q.shape[2], k.shape[2]], dim=2)


class LinearizedAttention(nn.Module):
    """Base class of converted attention layers.

    It owns the source attention's parameters under their original names (`q_proj`, `k_proj`, `v_proj`, `o_proj`
    and, for qk-norm families, `q_norm`/`k_norm`), so a converted checkpoint has the source's state-dict keys and
    conversion is a plain `load_state_dict`. The modules are taken from an instance of the family's own attention
    class, which keeps each family's bias and norm details in one place: transformers.
    """

    def __init__(self, config, layer_idx: int, family: Family):
        super().__init__()
        source = family.attention_class(config, layer_idx)
        self.layer_idx = layer_idx
        self.head_dim = source.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = source.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = source.q_proj, source.k_proj, source.v_proj, source.o_proj
        self.q_norm = getattr(source, "q_norm", None) if family.qk_norm else None
        self.k_norm = getattr(source, "k_norm", None) if family.qk_norm else None

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, D] as the source computes them before RoPE,
        and the raw key (before any qk-norm)."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k_raw = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        k = k_raw
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k_raw)
        return q, k, v, k_raw

    @staticmethod
    def token_validity(padding_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Which of the last `length` tokens are real (not padding), as a bool [B, T], from the 2-D mask."""
        if padding_mask is None:
            return None
        if padding_mask.ndim != 2:
            raise ValueError(
                "converted attention layers need the 2-D padding mask [batch, tokens]; got shape "
                f"{tuple(padding_mask.shape)}. Pass the tokenizer's attention_mask unchanged."
            )
        return padding_mask[:, -length:].bool()

    @staticmethod
    def layer_cache(cache, layer_idx: int):
        return None if cache is None else cache.layers[layer_idx]
