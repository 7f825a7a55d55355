"""The conversion methods: what each one turns an attention layer into, its parameters and their defaults.

A new method is one `Method` entry here plus its layer file in `linearize/layers/` (an `nn.Module` built
as `layer_class(config, layer_idx, family)`, named here as 'module.Class' under `linearize.layers`, with static
methods `cache_layer(config)` and `state_bytes(settings, heads, kv_heads, head_dim, dtype_bytes, tokens)`: cache
bytes of one sequence after `tokens` tokens). Layers whose new parameters are not in the source checkpoint give
them their conversion values in `init_new_parameters(device, dtype)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import LinearizeError


@dataclass(frozen=True)
class Method:
    name: str
    layer: str  # 'module.Class' in linearize.layers: named, not imported, so the CLI lists methods without torch
    layer_type: str  # transformers' `layer_types` value for a converted layer
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    adds_parameters: bool = False  # whether converted layers own parameters the source model lacks
    exact_at_conversion: bool = False  # converted layers compute the source's outputs until trained
    cache_growth: str = ""  # what makes the converted layers' cache grow with the context, if anything does

    @property
    def layer_class(self) -> type:
        module, _, name = self.layer.rpartition(".")
        return getattr(importlib.import_module(f"{__package__}.layers.{module}"), name)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "liger",
            "liger.LigerAttention",
            "hybrid_sliding",
            "gated linear attention with gates from the pretrained keys, mixed (0.5/0.5 by default) with a sliding"
            " window (optionally with attention sinks; window counts them)",
            {"window": 64, "sinks": 0, "mix": 0.5, "gate_normalizer": 16.0, "gate_source": "normed"},
        ),
        Method(
            "liger-gla",
            "liger.LigerAttention",
            "linear_attention",
            "Liger's gated linear attention alone, without the window branch",
            {"gate_normalizer": 16.0, "gate_source": "normed"},
        ),
        Method(
            "still",
            "still.StillAttention",
            "hybrid",
            "exact softmax for the top-k self-salient tokens of every chunk (and the last two chunks), NP-Map gated "
            "linear attention for the rest, one shared normalizer",
            {"chunk_size": 64, "topk": 4},
            adds_parameters=True,
            cache_growth="salient tokens",
        ),
        Method(
            "parallax",
            "parallax.ParallaxAttention",
            "full_attention",  # transformers validates layer_types; the probe changes no cache or mask
            "softmax attention corrected by a learned probe r (o = softmax average - covariance(v, k) r); exactly "
            "the source at conversion (r = 0), optionally over a sliding window",
            {"window": None},
            adds_parameters=True,
            exact_at_conversion=True,
            cache_growth="every token's keys and values, as softmax attention; set a window to cap it",
        ),
        Method(
            "swa",
            "swa.SinkWindowAttention",
            "sliding_attention",
            "training-free baseline: attention sinks plus a sliding window (window counts the sinks)",
            {"window": 64, "sinks": 4},
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LinearizeError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None
