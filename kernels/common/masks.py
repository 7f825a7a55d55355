"""Questions about a validity mask that a decode step asks on the host."""

import torch


def all_valid_known(mask: torch.Tensor) -> bool:
    """Whether every entry of `mask` is True, asked only where reading it is free: on a CPU. On a GPU the read would
    make the host wait for the device at every layer and token, so there the answer is False and the caller takes
    its masked form, which gives the same result."""
    return mask.device.type == "cpu" and bool(mask.all())
