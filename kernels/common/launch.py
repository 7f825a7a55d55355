"""Host-side launch helpers shared by every Triton kernel: the precision of `tl.dot`, the shared memory of the
current device, and autotuning over a few plausible configurations with those that cannot fit pruned first."""

import math
from collections.abc import Callable

import torch
import triton

LOG2E = math.log2(math.e)  # the kernels exponentiate in base 2: exp(x) = exp2(x * LOG2E), folded into the scale


def as_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool mask as uint8 over the same bytes, which Triton takes as a plain integer pointer; None stays None."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the kernels' `tl.dot`s, whose operands are in the model dtype: exact products for fp32
    (what the fp32 tests against the references need, and what an fp32 model asked for); half-precision operands
    multiply exactly on tensor cores whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, least: int = 16) -> int:
    """The tile covering n: a power of two, at least `least` (tl.dot needs every dimension >= 16)."""
    return max(least, triton.next_power_of_2(n))


def max_shared_memory() -> int | None:
    """Bytes of shared memory one block of the current device may use, as Triton's driver reports it (the limit
    Triton checks when it loads a kernel); None where no device answers (Triton's CPU interpreter)."""
    try:
        from triton.runtime import driver

        return driver.active.utils.get_device_properties(driver.active.get_current_device())["max_shared_mem"]
    except Exception:
        return None


def element_size(x) -> int:
    return x.element_size() if isinstance(x, torch.Tensor) else 4


def fitting(shared_estimate: Callable[[dict], int], excluded: Callable[[dict], bool] | None = None) -> Callable:
    """`early_config_prune` for `triton.autotune`: keep the configurations whose shared memory, estimated from the
    launch arguments and the configuration (`shared_estimate(args)`, args holding both), fits the device; when none
    does, the smallest. The estimate must not undershoot: the compile check compiles every configuration that
    survives for sm_80 and sm_90 and fails when one is over the limit. Configurations `excluded(args)` names (one
    that spills for some launches, say) are dropped first; it must leave at least one."""

    def prune(configs, named_args, **kwargs):
        if excluded is not None:
            configs = [c for c in configs if not excluded({**named_args, **kwargs, **c.all_kwargs()})]
        limit = max_shared_memory()
        if limit is None or len(configs) == 1:
            return configs
        sizes = [shared_estimate({**named_args, **kwargs, **c.all_kwargs()}) for c in configs]
        kept = [c for c, size in zip(configs, sizes, strict=True) if size <= limit]
        return kept or [configs[sizes.index(min(sizes))]]

    return prune


def autotune(
    configs: list[triton.Config],
    key: list[str],
    shared_estimate: Callable[[dict], int],
    excluded: Callable[[dict], bool] | None = None,
):
    """`triton.autotune` over `configs`, re-tuned for each value of `key` (and each input dtype, which Triton adds),
    with the configurations `excluded` names and those that cannot fit the device's shared memory pruned before any
    is tried."""
    prune = fitting(shared_estimate, excluded)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})
