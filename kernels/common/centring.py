"""Keys minus their mean: the same softmax attention, computed with better rounding where the keys share a large
component (docs/methods.md §0.3).

Moving every key of a (batch row, key head) by one vector c moves each query's logits z_ij = scale q_i . k_j by a
constant, scale q_i . c, which a softmax with a max shift cancels; so the outputs do not change, and neither do the
gradients: the score gradients ds_ij of a query sum to zero over its keys, so dq_i = scale sum_j ds_ij k_j is the
same with k_j - c, and dk_j does not involve the keys' values. Parallax's s_ij = r_i . k_j moves by r_i . c, which
t_bar_i - s_ij cancels, and its gradient gu_ij sums to zero too. STILL's softmax part shares its max shift with no
term that reads the keys (its linear part reads separate key features), so it is exact there as well. A logit
softcap is not: tanh(z + const) is not tanh(z) + const, so capped logits take the keys as they are.

In floating point it matters. Keys that share a large component (a k_proj bias puts |k| in the hundreds in some
channels of Qwen2.5) make dq = sum_j ds_j k_j cancel that component, and whatever rounds ds before the sum (the
model dtype of a tensor-core product, or the fp32 rounding of a large logit) leaves a residual multiplied by it: bf16
dq came out 50% off on the Triton kernels (Parallax's fp32 dq 1e-3, its bf16 output 30%, s = r . k being large too).
"""

import torch


def key_mean(k: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The mean `[B, 1, Hkv, D]` of the valid keys of `k` `[B, S, Hkv, D]` (`key_valid` `[B, S]` bool, None: all
    valid), in `dtype`, without gradient; zeros for a row with no valid key. Invalid keys may hold anything (NaN)."""
    k = k.detach().to(dtype)
    if key_valid is None:
        return k.mean(1, keepdim=True)
    valid = key_valid.to(torch.bool)[:, :, None, None]
    return k.masked_fill(~valid, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)


def centre_keys(
    k: torch.Tensor, key_valid: torch.Tensor | None, *more: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """`k` `[B, S, Hkv, D]` and each of `more` (keys of the same softmax held apart: sinks `[B, E, Hkv, D]`; None
    passes through) minus the mean of the valid keys of `k`, subtracted in fp32 (float64 for float64 keys) and
    rounded back to each one's dtype. Differentiable: the mean is a constant, so gradients pass through unchanged.
    Exact in exact arithmetic for logits that enter only a softmax with a max shift; not with a softcap."""
    c = key_mean(k, key_valid, torch.promote_types(k.dtype, torch.float32))
    return tuple(None if x is None else (x.to(c.dtype) - c).to(x.dtype) for x in (k, *more))
