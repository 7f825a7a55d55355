"""The generation cache of a converted model: one entry per layer, constant size for converted layers.

Kept softmax layers use transformers' own `DynamicLayer` (a growing KV cache), or for a kept sliding-window layer
its `DynamicSlidingWindowLayer` (the last window - 1 tokens). Converted layers use a
`StateCacheLayer` subclass defined next to their attention layer, built from the blocks in
`linearize.cache_layers`: a fixed-size buffer of the most recent tokens (`RecentTokens`) and whatever recurrent
state the method keeps.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

# module, not names: when linearize.cache_layers is what first imports transformers, this module is imported (to
# register the classes, see linearize.registration) before cache_layers has defined them
from .. import cache_layers
from ..methods import get_method
from .configuration import LinearizeConfig


class LinearizeCache(Cache):
    """One cache layer per model layer, chosen by `config.layer_types`."""

    def __init__(self, config: LinearizeConfig):
        method = get_method(config.method)
        layers = []
        for layer_idx, layer_type in enumerate(config.layer_types):
            if config.is_converted(layer_idx):
                layers.append(method.layer_class.cache_layer(config.layer_settings(layer_idx)))
            elif layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    def batch_size(self) -> int | None:
        """How many rows the converted layers hold, or None while they hold nothing."""
        for layer in self.layers:
            if isinstance(layer, cache_layers.StateCacheLayer) and (rows := layer.batch_size()) is not None:
                return rows
        return None

    def reset(self) -> None:
        """Empty every layer, as a new cache is. transformers 5.17 resets its own layers by zeroing their keys and
        values in place: a kept softmax layer still held the last sequence's tokens, as zeros, and counted them, so
        the next sequence attended to them and took its positions from their count."""
        super().reset()
        for layer in self.layers:
            if not isinstance(layer, cache_layers.StateCacheLayer):
                layer.keys = layer.values = None
                layer.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Refused, before any layer is touched, where there is something to remove: a converted layer's state
        cannot be rolled back, and a kept softmax layer cropped alone would leave the layers disagreeing."""
        converted = any(isinstance(layer, cache_layers.StateCacheLayer) for layer in self.layers)
        if tokens_to_remove and converted:
            raise NotImplementedError(
                "a LinearizeCache cannot be cropped: a converted layer's state (a linear state, a window of recent "
                "tokens) cannot be rolled back. To go back to an earlier point, keep a copy of the cache made there "
                "(copy.deepcopy(cache)) and continue from it"
            )
        super().crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes of the tokens the cache holds right now, over all layers: a kept softmax layer's keys and values by
        their size (a sliding-window layer's window, as the plan counts it; right after a prefill longer than the
        window its keys are a view of the whole prefill's, whose storage `benchmark.cache_bytes` counts)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, cache_layers.StateCacheLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total
