"""Diagnostics of benchmarks/gpu_check.py for a row that fails on a GPU: where the error sits, and whether one
launch configuration of an autotuned kernel or all of them produce it."""

import contextlib
import sys
from collections.abc import Callable

import torch


def relative_error(ref: torch.Tensor | None, out: torch.Tensor | None) -> float:
    """||ref - out|| / ||ref||; NaN (a FAIL) when a gradient is missing or the shapes differ."""
    if ref is None or out is None or ref.shape != out.shape:
        return float("nan")
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


def locate(ref: torch.Tensor, out: torch.Tensor, chunk_size: int) -> str:
    """Where the error of a `[B, T, H, ...]` tensor sits: the share in the worst 1% of (token, head) rows, the
    relative error by query chunk (the first two chunks read no older chunk) and by head, the worst rows."""
    error = (ref.double() - out.double()).flatten(3).square().sum(-1)  # [B, T, H]
    norm = ref.double().flatten(3).square().sum(-1)
    T, H = error.shape[1:]
    worst = error.flatten().topk(max(1, error.numel() // 100))
    chunk = torch.arange(T, device=error.device) // chunk_size
    by_chunk = [(error[:, sel].sum() / norm[:, sel].sum()).sqrt() for sel in (chunk == 0, chunk == 1, chunk >= 2)]
    by_head = (error.sum((0, 1)) / norm.sum((0, 1))).sqrt()
    rows = ", ".join(f"t={i // H % T} h={i % H}" for i in worst.indices[:3].tolist())
    return (
        f"worst 1% of rows hold {worst.values.sum() / error.sum():.0%} of the error; by query chunk 0 / 1 / later "
        + " / ".join(f"{e:.1e}" for e in by_chunk)
        + f"; by head {by_head.min():.1e} to {by_head.max():.1e} (worst h={int(by_head.argmax())}); worst rows {rows}"
    )


FAMILIES = {  # the kernel folders an op launches from, for the configuration sweep
    "gated_linear_attention": ("gla", "common"),
    "sliding_window + sinks": ("window",),
    "liger_attention": ("liger", "gla", "window", "common"),
    "liger_decode": ("liger",),
    "self_saliency": ("still",),
    "still_attention": ("still", "common"),
    "parallax_attention": ("parallax",),
    "parallax_decode": ("parallax",),
}


def autotuned_kernels(families: tuple[str, ...]) -> list:
    """The autotuned Triton kernels of those kernel folders that have run (tuned for some key) in this process."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for name, module in list(sys.modules.items()):
        parts = name.split(".")
        if name.startswith("linearize.kernels.") and set(parts) & set(families):
            for obj in vars(module).values():
                if isinstance(obj, Autotuner) and obj.cache and len(obj.configs) > 1:
                    found[id(obj)] = obj
    return list(found.values())


@contextlib.contextmanager
def forced(kernel, config):
    """Launch `kernel` (a triton Autotuner) with `config` alone; its tuned choices come back afterwards."""
    configs, cache = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = configs, cache


def sweep_configs(families: tuple[str, ...], rerun: Callable[[], dict], reference: dict, failed: list[str]) -> None:
    """Rerun our op (`rerun()` -> its outputs and gradients) with each configuration of each of its autotuned
    kernels forced in turn, the others keeping their tuned choice, and print the failing quantities' errors: one
    configuration failing alone points at a miscompile, every one failing at the algorithm or precision."""
    for kernel in autotuned_kernels(families):
        for config in kernel.configs:
            with forced(kernel, config):
                ours = rerun()
            tuned = " (tuned)" if any(config is c for c in kernel.cache.values()) else ""
            launch = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            errors = " ".join(f"{q} {relative_error(reference[q], ours[q]):.2e}" for q in failed)
            print(
                f"    {kernel.fn.__name__} {launch} w{config.num_warps} s{config.num_stages}{tuned}: {errors}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(f"{__file__} holds helpers of benchmarks/gpu_check.py, which is the script to run (see its --help)")
