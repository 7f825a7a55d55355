"""The building blocks of a converted layer's cache: `StateCacheLayer`, the base of every converted layer's cache
entry; `RecentTokens`, a ring of the most recent tokens; `GrowingTokens`, every token so far in storage that grows
geometrically; and `own`, which keeps a cached tensor from holding a larger storage alive.

A decode step must cost the same at every context: buffers are allocated once (or grown geometrically) and a new
token is written into its slot in place, never concatenated onto a copy of everything before it.

Each method's cache layer is a `StateCacheLayer` subclass defined next to its attention layer in
`linearize.layers`; `linearize.models.cache.LinearizeCache` holds one per converted layer. This module sits below
both and imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .kernels.common.buffers import append_along


def own(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a compact copy when it is a view into a larger storage: a cache that kept the view would keep all
    of that storage alive (keys split from a rotated [q, r, k] block, slots cut from a buffer with a spare slot)."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class TokenBuffer:
    """Per-token tensors ([B, T, ...] each, aligned) that a cache layer keeps; `StateCacheLayer` reorders, clears
    and counts them through this interface."""

    def __init__(self):
        self.tensors: tuple[torch.Tensor, ...] | None = None

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.tensors is not None:
            self.tensors = tuple(fn(t) for t in self.tensors)

    def clear(self) -> None:
        self.tensors = None


class RecentTokens(TokenBuffer):
    """The last `capacity` tokens of several aligned per-token tensors ([B, T, ...] each), after `reserved` leading
    slots that the owner fills itself (a sink window's sinks).

    Storage is `reserved + capacity + 1` slots per tensor, allocated on the first update (empty slots are zeros, so
    a validity tensor among them reads False there); it never grows or moves. After the reserved slots, slots form
    a ring: the buffered tokens and one spare slot. A one-token update writes the new token into the spare slot in
    place and returns the whole storage, which is then exactly the reserved slots, the buffered tokens and the new
    one, in ring order: what one query attends to, where order does not matter (keys carry their rotary positions,
    every ring slot is inside its window, and the owner's validity marks the reserved slots it has not filled). A
    longer update returns the buffered tokens and the new ones in time order, as a new tensor, and rewrites the
    ring from them.
    """

    def __init__(self, capacity: int, reserved: int = 0):
        super().__init__()  # tensors: each [B, reserved + capacity + 1, ...]
        self.capacity = capacity
        self.reserved = reserved
        self.spare = capacity  # the ring slot that holds no buffered token; the oldest token is in the next one

    def update(self, *new: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Add `new` tokens ([B, T, ...] each). Returns the tokens a query attends to (for T = 1 the whole storage,
        `reserved + capacity + 1` slots in ring order; otherwise the `capacity + T` buffered and new tokens in time
        order) and the tokens that fell out of the buffer, oldest first (views that the next update may
        overwrite)."""
        length, first = new[0].shape[1], self.reserved
        if self.tensors is None:
            self.tensors = tuple(t.new_zeros(t.shape[0], first + self.capacity + 1, *t.shape[2:]) for t in new)
        elif length == 1:
            for buffer, t in zip(self.tensors, new, strict=True):
                buffer[:, first + self.spare] = t[:, 0]
            self.spare = (self.spare + 1) % (self.capacity + 1)  # the oldest token's slot: it leaves the ring
            evicted = tuple(buffer[:, first + self.spare : first + self.spare + 1] for buffer in self.tensors)
            return self.tensors, evicted
        joined = tuple(
            torch.cat([self._in_time_order(b), t.to(b.dtype)], dim=1) for b, t in zip(self.tensors, new, strict=True)
        )
        for buffer, t in zip(self.tensors, joined, strict=True):
            buffer[:, first : first + self.capacity] = t[:, length:]
        self.spare = self.capacity
        return joined, tuple(t[:, :length] for t in joined)

    def reserved_slots(self) -> tuple[torch.Tensor, ...] | None:
        """Views of the reserved slots of each tensor ([B, reserved, ...]), or None before the first update."""
        if self.tensors is None:
            return None
        return tuple(t[:, : self.reserved] for t in self.tensors)

    def _in_time_order(self, buffer: torch.Tensor) -> torch.Tensor:
        ring = buffer[:, self.reserved :]
        oldest = (self.spare + 1) % (self.capacity + 1)
        if oldest == 0:
            return ring[:, : self.capacity]
        return torch.cat([ring[:, oldest:], ring[:, : self.spare]], dim=1)

    def clear(self) -> None:
        super().clear()
        self.spare = self.capacity


class GrowingTokens(TokenBuffer):
    """Every token so far of several aligned per-token tensors, in time order; time is dimension 1 of each
    ([B, T, ...]) unless `time_dims` says otherwise (a head-major [B, heads, T, D] cache: 2).

    The first update stores its tokens as they are (a prefill's cache holds no more than its tokens); later ones
    append in place into room that grows geometrically (`append_along`), so decoding T tokens copies O(T) in all.
    """

    def __init__(self, time_dims: tuple[int, ...] | None = None):
        super().__init__()
        self.time_dims = time_dims

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Add `new` tokens; returns all tokens so far (L along each tensor's time dimension)."""
        if self.tensors is None:
            self.tensors = tuple(own(t) for t in new)
        else:
            dims = self.time_dims or (1,) * len(new)
            self.tensors = tuple(
                append_along(b, t.to(b.dtype), dim) for b, t, dim in zip(self.tensors, new, dims, strict=True)
            )
        return self.tensors


class StateCacheLayer(CacheLayerMixin):
    """Base of the cache layers of converted attention: fixed-size state, no growing key/value list.

    Subclasses keep their tensors in attributes listed by `_tensor_fields` (a tensor or a `TokenBuffer`) so batch
    reordering (beam search, `num_return_sequences`) and byte counting work for all.
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
            if isinstance(value, TokenBuffer):
                value.apply(fn)
            elif value is not None:
                setattr(self, name, fn(value))

    def reset(self) -> None:
        for name in self._tensor_fields:
            value = getattr(self, name)
            if isinstance(value, TokenBuffer):
                value.clear()
            else:
                setattr(self, name, None)
        self.seen_tokens = 0

    def batch_size(self) -> int | None:
        """How many rows the layer holds, or None while it holds nothing."""
        for name in self._tensor_fields:
            value = getattr(self, name)
            tensors = value.tensors if isinstance(value, TokenBuffer) else (value,)
            for tensor in tensors or ():
                if tensor is not None:
                    return tensor.shape[0]
        return None

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
        """Bytes of the storage the cache holds, spare room included (each storage counted once)."""
        storages = {}
        for name in self._tensor_fields:
            value = getattr(self, name)
            if isinstance(value, TokenBuffer):
                value = value.tensors
            for tensor in value if isinstance(value, tuple) else (value,):
                if tensor is not None:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())
