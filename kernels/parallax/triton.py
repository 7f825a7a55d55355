"""Parallax attention in Triton: host code, autograd and the entry point (kernels in triton_fwd and triton_bwd, whose
docstrings give the algorithm and the gradients).

Forward: one kernel (outputs plus the statistics the backward needs). Backward: the per-query dot products
t = dO . o and b = dO . v_bar in torch, then one kernel for dq and dr, one for dk and dv. History keys are
concatenated in front of the new ones, so the kernels see one key sequence of S = P + T and the history gets its
gradients through the concatenation. The keys are taken minus their mean over the valid ones
(`common.centring.centre_keys`, exact: z and s move by a constant per query), which keeps a large shared component
(a k_proj bias) out of the rounding of s, w s and dq's sum. Every input is cast to q's dtype (the model's: fp32,
bf16 or fp16), the dtype of every matmul operand; accumulation is fp32.
"""

import torch
import triton

from ..common.centring import centre_keys
from ..common.launch import LOG2E, as_bytes, autotune, dot_precision, element_size, pow2
from .reference import check_inputs, with_history
from .triton_bwd import parallax_bwd_dkdv_kernel, parallax_bwd_dq_kernel
from .triton_fwd import parallax_fwd_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch configurations (BM, BN, warps, stages). In half precision, per head-dim tile BD: the list of the smallest
# key >= BD (the last beyond it). Each compiles for sm_80 and sm_90, bf16 and fp16, without spilling (`python -m
# linearize.kernels.compile_check --methods parallax`); the autotuner times those whose shared memory fits. Wide
# heads leave room for 64 queries of q, r and the two fp32 accumulators per program, narrow ones for 128. fp32 (exact
# products on the CUDA cores, for the tests and fp32 models) takes one small configuration at every head dim. In
# dk/dv BN is the keys of a program, BM the queries of a step.
FP32 = "fp32"
FWD_CONFIGS = {
    64: [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
    128: [(64, 32, 8, 2), (64, 32, 8, 3)],
    FP32: [(64, 16, 8, 1)],
}
DQ_CONFIGS = {
    64: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 1)],
    128: [(64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2)],
    FP32: [(32, 32, 8, 1)],
}
DKDV_CONFIGS = {
    64: [(64, 32, 8, 1), (64, 32, 4, 2), (32, 32, 4, 2)],
    128: [(32, 64, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2)],
    FP32: [(32, 32, 8, 1)],
}


# Shared memory of a configuration, an upper bound of what Triton allocates: the tiles a program keeps (q and r;
# q, r and dO; k and v) once, the tiles of a key (or query) step once per pipeline stage, counting at least two;
# dk/dv also stages the four statistics of its queries.
def _fwd_shared(a: dict) -> int:
    return element_size(a["q"]) * a["BD"] * (2 * a["BM"] + 2 * a["BN"] * max(a["num_stages"], 2))


def _dq_shared(a: dict) -> int:
    return element_size(a["q"]) * a["BD"] * (3 * a["BM"] + 2 * a["BN"] * max(a["num_stages"], 2))


def _dkdv_shared(a: dict) -> int:
    stages = max(a["num_stages"], 2)
    return element_size(a["q"]) * a["BD"] * (2 * a["BN"] + 3 * a["BM"] * stages) + 4 * 4 * a["BM"] * stages


def _tuners(kernel, table: dict, shared_estimate) -> dict:
    """`kernel` autotuned over each list of `table`, keyed on the head dim (and the dtypes, which Triton adds)."""
    return {
        name: autotune(
            [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in configs],
            key=["D"],
            shared_estimate=shared_estimate,
        )(kernel)
        for name, configs in table.items()
    }


_FWD = _tuners(parallax_fwd_kernel, FWD_CONFIGS, _fwd_shared)
_DQ = _tuners(parallax_bwd_dq_kernel, DQ_CONFIGS, _dq_shared)
_DKDV = _tuners(parallax_bwd_dkdv_kernel, DKDV_CONFIGS, _dkdv_shared)


def _launch(tuners: dict, kernel, blocks: dict | None, grid, *args, **meta) -> None:
    """Launch `kernel` over `grid(config)`: with the tuned configurations of its dtype and head-dim tile, or with the
    fixed `blocks` of a test."""
    if blocks is not None:
        kernel[grid(blocks)](*args, **meta, **blocks)
        return
    if args[0].dtype == torch.float32:
        name = FP32
    else:
        tiles = [bd for bd in tuners if bd != FP32]
        name = min((bd for bd in tiles if bd >= meta["BD"]), default=max(tiles))
    tuners[name][grid](*args, **meta)


def parallax_fwd(q, r, k, v, key_valid, scale, window, save, blocks):
    """Returns o `[B, T, H, D]` (q.dtype) and, if `save`, v_bar `[B, T, H, D]`, t_bar and the log2-sum-exp
    `[B, T, H]` (fp32; else None). Inputs are contiguous, of one dtype, k and v `[B, S, Hkv, D]`."""
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    v_bar = torch.empty(B, T, H, D, dtype=torch.float32, device=q.device) if save else None
    t_bar, lse = (torch.empty(B, T, H, dtype=torch.float32, device=q.device) if save else None for _ in range(2))
    _launch(
        _FWD, parallax_fwd_kernel, blocks, lambda c: (triton.cdiv(T, c["BM"]), B * H),
        q, r, k, v, key_valid, o, v_bar, t_bar, lse, scale * LOG2E, T, S, window,
        H=H, HKV=HKV, G=H // HKV, D=D, BD=pow2(D), HAS_KEY_VALID=key_valid is not None, STORE_STATS=save,
        DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return o, v_bar, t_bar, lse


def parallax_bwd(saved, do, scale, window, blocks):
    """Returns dq, dr, dk, dv in the inputs' dtype."""
    q, r, k, v, key_valid, o, v_bar, t_bar, lse = saved
    B, T, H, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    t = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, H]
    b = (do.float() * v_bar).sum(-1).contiguous()
    dq, dr, dk, dv = (torch.empty_like(x) for x in (q, r, k, v))
    args = (q, r, k, v, key_valid, do, lse, t_bar, t, b)
    meta = dict(H=H, HKV=HKV, G=H // HKV, D=D, BD=pow2(D), HAS_KEY_VALID=key_valid is not None)
    meta["DOT_PREC"] = dot_precision(q.dtype)
    _launch(
        _DQ, parallax_bwd_dq_kernel, blocks, lambda c: (triton.cdiv(T, c["BM"]), B * H),
        *args, dq, dr, scale, scale * LOG2E, T, S, window, **meta,
    )  # fmt: skip
    _launch(
        _DKDV, parallax_bwd_dkdv_kernel, blocks, lambda c: (triton.cdiv(S, c["BN"]), B * HKV),
        *args, dk, dv, scale, scale * LOG2E, T, S, window, **meta,
    )  # fmt: skip
    return dq, dr, dk, dv


class ParallaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, key_valid, scale, window, blocks):
        save = any(ctx.needs_input_grad[:4])
        o, v_bar, t_bar, lse = parallax_fwd(q, r, k, v, key_valid, scale, window, save, blocks)
        if save:
            ctx.save_for_backward(q, r, k, v, key_valid, o, v_bar, t_bar, lse)
            ctx.config = (scale, window, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q = ctx.saved_tensors[0]
        grads = parallax_bwd(ctx.saved_tensors, do.to(q.dtype).contiguous(), *ctx.config)
        return (*grads,) + (None,) * 4


def triton_parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Parallax attention with Triton kernels; arguments and returns as in `naive_parallax_attention`.

    Differentiable w.r.t. q, r, k, v, past_k and past_v. Inputs must be fp32, bf16 or fp16; they are multiplied in
    q's dtype and their gradients come back in their own. `block_m` and `block_n` (powers of two >= 16, both or
    neither) fix the query and key tiles of every kernel instead of the tuned ones, for tests.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    tensors = (q, r, k, v) if past_k is None else (q, r, k, v, past_k, past_v)
    if any(x.dtype not in DTYPES for x in tensors):
        raise ValueError(f"the Triton path takes {DTYPES}, got {[x.dtype for x in tensors]}")
    if (block_m is None) != (block_n is None):
        raise ValueError("give block_m and block_n together, or neither")
    blocks = None
    if block_m is not None:
        for name, block in (("block_m", block_m), ("block_n", block_n)):
            if block < 16 or block & (block - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {block}")
        blocks = dict(BM=block_m, BN=block_n, num_warps=4, num_stages=1)
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    keys, values = with_history(k, v, past_k, past_v)
    S, D = keys.shape[1], q.shape[-1]
    window = S if window is None else min(int(window), S)  # no query sees more than S keys; keeps it within int32
    scale = D**-0.5 if scale is None else float(scale)
    key_valid = as_bytes(key_valid)
    # the keys minus their mean, subtracted in fp32 (exact: z and s move by a constant per query; common/centring.py):
    # keys sharing a large component (a k_proj bias) left dq 1e-3 off in fp32 and made s = r . k so large that bf16
    # w s lost the output (30% off) and every gradient
    (keys,) = centre_keys(keys, key_valid)
    # one dtype for the matmul operands (a no-op in the usual case; autograd casts the gradients back)
    q, r, keys, values = (x.to(q.dtype).contiguous() for x in (q, r, keys, values))
    return ParallaxFunction.apply(q, r, keys, values, key_valid, scale, window, blocks)
