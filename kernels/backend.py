"""Backend selection shared by every public kernel entry point."""

import os

import torch

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "LINEARIZE_BACKEND"


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Pick the implementation a kernel call runs on.

    Args:
        requested: "reference", "torch", "triton" or None. None reads the environment variable
            `LINEARIZE_BACKEND` and falls back to "torch" when it is unset or empty.
        device: device of the inputs. Kept in the signature so Triton support can depend on it.

    Returns:
        The validated backend name.
    """
    name = requested if requested is not None else (os.environ.get(ENV_VAR) or "torch")
    if name not in BACKENDS:
        source = f"{ENV_VAR}={name!r}" if requested is None else repr(name)
        raise ValueError(f"Unknown kernel backend {source}; valid backends are {', '.join(map(repr, BACKENDS))}.")
    if name == "triton":
        raise NotImplementedError(
            f"Triton kernels arrive in a later version of linearize (requested on {device}); use backend='torch'."
        )
    return name
