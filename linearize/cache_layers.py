"""The building blocks of a converted layer's cache: `StateCacheLayer`, the base of every converted layer's cache
entry, `RecentTokens`, a fixed-size buffer of the most recent tokens, and `own`, which keeps a cached tensor from
holding a larger storage alive.

Each method's cache layer is a `StateCacheLayer` subclass defined next to its attention layer in
`linearize.layers`; `linearize.models.cache.LinearizeCache` holds one per converted layer. This module sits below
both and imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin


def own(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a compact copy when it is a view into a larger storage: a cache that kept the view would keep all
    of that storage alive, unseen by `nbytes` (keys split from a rotated [q, r, k] block, slots cut from a buffer
    with a spare slot)."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class RecentTokens:
    """The last `capacity` tokens of several aligned per-token tensors ([B, T, ...] each), in time order.

    Storage is allocated once, at `capacity`, on the first append (empty slots are zeros, so a validity tensor
    among them reads False there): the buffer never grows with the context.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tensors: tuple[torch.Tensor, ...] | None = None

    def update(self, *new: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Add `new` tokens. Returns the buffered tokens followed by the new ones (what a window attends to),
        and the tokens that fell out of the buffer (oldest first)."""
        if self.tensors is None:
            self.tensors = tuple(t.new_zeros(t.shape[0], self.capacity, *t.shape[2:]) for t in new)
        joined = tuple(torch.cat([old, t.to(old.dtype)], dim=1) for old, t in zip(self.tensors, new, strict=True))
        cut = joined[0].shape[1] - self.capacity
        # a view is free; after a long prefill, a copy releases the rest of the joined tensor
        self.tensors = tuple(t[:, cut:].clone() if cut > self.capacity else t[:, cut:] for t in joined)
        return joined, tuple(t[:, :cut] for t in joined)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.tensors is not None:
            self.tensors = tuple(fn(t) for t in self.tensors)


class StateCacheLayer(CacheLayerMixin):
    """Base of the cache layers of converted attention: fixed-size state, no growing key/value list.

    Subclasses keep their tensors in attributes listed by `_tensor_fields` (a tensor or a `RecentTokens`)
    so batch reordering (beam search, `num_return_sequences`) and byte counting work for all of them.
    """

    _tensor_fields: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.seen_tokens = 0

    # transformers' attention layers call `update`; ours read and write their state through their own methods.
    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} holds a converted layer's state; it has no key/value list to update")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in self._tensor_fields:
            value = getattr(self, name)
            if isinstance(value, RecentTokens):
                value.apply(fn)
            elif value is not None:
                setattr(self, name, fn(value))

    def reset(self) -> None:
        for name in self._tensor_fields:
            value = getattr(self, name)
            if isinstance(value, RecentTokens):
                value.tensors = None
            else:
                setattr(self, name, None)
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a converted layer's state cannot be rolled back")

    def nbytes(self) -> int:
        total = 0
        for name in self._tensor_fields:
            value = getattr(self, name)
            if isinstance(value, RecentTokens):
                value = value.tensors
            for tensor in value if isinstance(value, tuple) else (value,):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total
