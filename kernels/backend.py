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
SOFTCAP_NOT_IN_TRITON = "attention logit soft-capping (Gemma 2) has no Triton kernel yet; use backend 'torch'"


class BackendError(Exception):
    """A backend choice (`backend=` or LINEARIZE_BACKEND) that cannot run the call: the user's to fix, as the
    message says (the CLI prints it as an error line)."""


class BackendChoiceError(BackendError, ValueError):
    """A backend name that does not exist, or one that cannot run on the inputs' device."""


class BackendNotImplemented(BackendError, NotImplementedError):
    """A backend this op (or this call's arguments) does not offer."""


def resolve_backend(
    requested: str | None,
    device: torch.device,
    available: tuple[str, ...] = BACKENDS,
    unsupported: dict[str, str] | None = None,
) -> str:
    """Pick the implementation a kernel call runs on.

    Args:
        requested: "reference", "torch", "triton", "fla" (flash-linear-attention, where an op offers it) or
            None. None reads the environment variable `LINEARIZE_BACKEND`; when that is unset or empty, CUDA
            tensors get "triton" (if the op has it for this call) and everything else "torch".
        device: device of the inputs.
        available: the backends this op implements.
        unsupported: backends of `available` that cannot run this call's arguments, each with the reason (the
            message of the NotImplementedError an explicit request gets); see `softcap_unsupported`.

    Returns:
        The validated backend name.
    """
    unsupported = unsupported or {}
    name = requested if requested is not None else (os.environ.get(ENV_VAR) or None)
    if name is None:
        return "triton" if device.type == "cuda" and "triton" in available and "triton" not in unsupported else "torch"
    chosen_by = f" ({ENV_VAR}={name!r})" if requested is None else ""
    if name not in BACKENDS:
        valid = ", ".join(map(repr, BACKENDS))
        raise BackendChoiceError(f"Unknown kernel backend {name!r}{chosen_by}; valid backends are {valid}.")
    if name not in available:
        raise BackendNotImplemented(f"this op has no {name!r} implementation yet{chosen_by}; use one of {available}")
    if name in unsupported:
        raise BackendNotImplemented(f"{unsupported[name]}{chosen_by}")
    if name in ("triton", "fla") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendChoiceError(
            f"{name!r}{chosen_by} runs Triton kernels, which need CUDA tensors, got {device}; use backend 'torch' on "
            "CPU (or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return name


def softcap_unsupported(softcap: float | None) -> dict[str, str]:
    """The backends that cannot cap attention logits at `softcap` (Gemma 2's softcap * tanh(logit / softcap)), for
    `resolve_backend(unsupported=...)`: "triton" when a cap is set, none otherwise. Raises a ValueError for a cap
    that is not positive."""
    if softcap is None:
        return {}
    if not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    return {"triton": SOFTCAP_NOT_IN_TRITON}


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
