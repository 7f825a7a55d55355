"""Tensors that grow along one dimension with room to spare, so that appending a few slots at a time (a decode
cache) costs amortized O(1) copies per slot instead of a copy of everything before them."""

import math

import torch

GROWTH = 1.25  # a buffer that must move takes this many times the slots it needs


def append_along(x: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """`torch.cat([x, new], dim)`, written in place into the room after `x` when `x` is the leading part (along
    `dim`) of a buffer this function made; otherwise copied into a new such buffer with room for `GROWTH` times
    the slots. The result is a view of that buffer: a later append may write into the room after it, so the caller
    keeps only the result, never an earlier `x` (a cache that replaces its tensors does)."""
    dim = dim % x.dim()
    size = x.shape[dim] + new.shape[dim]
    if size > _room(x, dim):
        shape = list(x.shape)
        shape[dim] = max(size, math.ceil(GROWTH * size))
        buffer = x.new_empty(shape)
        buffer.narrow(dim, 0, x.shape[dim]).copy_(x)
        x = buffer.narrow(dim, 0, x.shape[dim])
    grown = list(x.shape)
    grown[dim] = size
    out = x.as_strided(grown, x.stride(), x.storage_offset())
    out.narrow(dim, x.shape[dim], new.shape[dim]).copy_(new)
    return out


def _room(x: torch.Tensor, dim: int) -> int:
    """Slots along `dim` of the buffer whose leading part `x` is (x.shape[dim] when it is not such a part)."""
    if dim == 0 or x.storage_offset() != 0 or x.numel() == 0:
        return x.shape[dim]
    room = x.stride(dim - 1) // max(x.stride(dim), 1)
    shape = list(x.shape)
    shape[dim] = room
    if x.stride() != _contiguous_strides(shape):
        return x.shape[dim]
    if x.untyped_storage().nbytes() != math.prod(shape) * x.element_size():
        return x.shape[dim]
    return room


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return tuple(strides)
