"""The process group under `torchrun`, and the few collective operations the trainer needs.

Without `torchrun` (no WORLD_SIZE in the environment) everything here is a no-op on one process, so the
trainer has a single code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import LinearizeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    joined: bool = False  # whether `init_world` joined the process group (the caller may have joined it before)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join the process group when launched by torchrun: NCCL on CUDA (one GPU per local rank, made the process's
    current device), gloo on CPU. One process trains on the caller's current GPU and leaves it current."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    elif size == 1:  # the GPU a script chose (`torch.cuda.set_device`), which is not ours to change
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if size == 1:
        return World(device=device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device, joined=joined)


def close_world(world: World) -> None:
    """Leave the process group if `init_world` joined it: a script that joined it first keeps it after the run."""
    if world.joined and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes."""
    if not world.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world.size


def sum_across(world: World, value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all processes."""
    if not world.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def average_gradients(world: World, params: list[torch.nn.Parameter]) -> None:
    """Average `.grad` over processes, in one flat all-reduce."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def from_main(world: World, value):
    """The main process's `value` (any picklable object), on every process."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(world: World, value) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


@contextmanager
def together(world: World) -> Iterator[None]:
    """Every process runs the block, then waits for the others (a barrier). If it failed on some process (the main
    one writing a checkpoint to a full disk, say), every process stops: that one with its error, the others with a
    LinearizeError naming it, where they would have waited at their next collective for a process that had exited
    and printed gloo's "Connection closed by peer" traceback."""
    if not world.distributed:
        yield
        return
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 -- re-raised below, after the others have heard of it
        error = caught
    failed = torch.zeros(world.size, device=world.device)
    failed[world.rank] = error is not None
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        which = f"process {ranks[0]}" if len(ranks) == 1 else f"processes {', '.join(map(str, ranks))}"
        raise LinearizeError(f"stopped because {which} failed: see its error")
