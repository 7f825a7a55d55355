"""Backend selection shared by every public kernel entry point."""

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

BACKENDS = ("reference", "torch", "triton", "fla")
ENV_VAR = "LINEARIZE_BACKEND"


def resolve_backend(requested: str | None, device: torch.device, available: tuple[str, ...] = BACKENDS) -> str:
    """Pick the implementation a kernel call runs on.

    Args:
        requested: "reference", "torch", "triton", "fla" (flash-linear-attention, where an op offers it) or
            None. None reads the environment variable `LINEARIZE_BACKEND`; when that is unset or empty, CUDA
            tensors get "triton" (if the op has it) and everything else "torch".
        device: device of the inputs.
        available: the backends this op implements.

    Returns:
        The validated backend name.
    """
    name = requested if requested is not None else (os.environ.get(ENV_VAR) or None)
    if name is None:
        return "triton" if device.type == "cuda" and "triton" in available else "torch"
    if name not in BACKENDS:
        source = f"{ENV_VAR}={name!r}" if requested is None else repr(name)
        raise ValueError(f"Unknown kernel backend {source}; valid backends are {', '.join(map(repr, BACKENDS))}.")
    if name not in available:
        raise NotImplementedError(f"this op has no {name!r} implementation yet; use one of {available}")
    if name in ("triton", "fla") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name!r} runs Triton kernels, which need CUDA tensors, got {device}; use backend 'torch' on CPU "
            "(or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return name


def outside_autocast(op: Callable[P, R]) -> Callable[P, R]:
    """Run a public op with autocast off on its inputs' device: its implementations choose their own precision
    (fp32 accumulation on the torch path, fp32 accumulators in Triton) whatever region a model calls them from.
    Under `torch.autocast` the torch path's fp32 matrix products would otherwise run in bfloat16."""

    @functools.wraps(op)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        device = next(x.device.type for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
        if not torch.is_autocast_enabled(device):
            return op(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return op(*args, **kwargs)

    return run
