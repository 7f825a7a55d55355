"""Fused STILL attention in Triton: host code, autograd, and the entry point (kernels in attention_triton_fwd and
attention_triton_bwd, whose docstrings give the algorithm and the gradients).

Forward: the salient keys of every chunk are listed by token index (torch, one host sync for the largest count),
the shared chunk-state recurrence gives the linear state every chunk reads, one kernel computes the outputs.
Backward: the states are recomputed rather than saved (`[B * N, H, F, Dv]` fp32, larger than all the inputs at
F = 2D); the query-side kernel, the shared recurrence carrying the state gradients in reverse, then the salient,
linear and key-side kernels. Every matmul multiplies operands in the model dtype (q's; the other inputs are cast
to it) into fp32 accumulators; states and statistics are fp32. No [T, T] matrix: a query chunk reads its own and
the previous chunk's keys plus the listed salient keys. The keys are taken minus their mean over the valid ones
(`common.centring.centre_keys`; exact, each query's logits and their max move by one constant), so that a large
component they share (a k_proj bias) does not multiply the rounding of dz in dq = dz k.
"""

import warnings

import torch

from ..common.centring import centre_keys
from ..common.chunk_state import ChunkLayout, chunk_layout, chunk_state_grads, chunk_states
from ..common.launch import LOG2E, as_bytes, dot_precision, pow2
from .attention_triton_bwd import (
    still_bwd_key_kernel,
    still_bwd_linear_kernel,
    still_bwd_query_kernel,
    still_bwd_salient_kernel,
)
from .attention_triton_fwd import NO_KEY, still_fwd_kernel
from .reference import check_inputs

SALIENT_BLOCK = 64  # salient slots per inner step of the forward and the query-side backward
UNVERIFIED_BACKWARD = (
    "STILL's fused Triton backward gave a wrong dq (relative error 0.3, every other gradient right) in bfloat16 on "
    "an H200 with triton 3.6 (docs/gpu-runs.md, 2026-12-04), while the same kernels are right under Triton's "
    "interpreter; until a GPU run verifies a fix, train STILL with LINEARIZE_BACKEND=torch"
)


def salient_slots(salient: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, int]:
    """The token index of every salient key of the chunks that queries read through the salient set.

    Args:
        salient: `[B, T, H]` bool, False at invalid positions.
        chunk_size: C.

    Returns:
        slots `[B, H, max(N - 2, 1) * S]` int32: chunk n's keys for head h in slots n * S .. n * S + S - 1, in token
        order, NO_KEY in unused slots; and S >= 1, the largest count in one chunk and head (a host sync).
    """
    B, T, H = salient.shape
    C = chunk_size
    n_old = max(-(-T // C) - 2, 0)  # chunks 0..N-3: only they are ever two chunks behind a query
    if n_old == 0:
        return torch.full((B, H, 1), NO_KEY.value, dtype=torch.int32, device=salient.device), 1
    old = salient[:, : n_old * C].reshape(B, n_old, C, H)
    S = max(int(old.sum(2).amax()), 1)
    order = torch.argsort((~old).to(torch.uint8), dim=2, stable=True)[:, :, :S]  # [B, n_old, S, H], salient first
    token = order + torch.arange(n_old, device=salient.device)[:, None, None] * C
    slots = torch.where(old.gather(2, order), token, NO_KEY.value)
    return slots.permute(0, 3, 1, 2).reshape(B, H, n_old * S).to(torch.int32).contiguous(), S


def _tiles(q: torch.Tensor, v: torch.Tensor, C: int) -> dict:
    # a chunk and the q/k and v head dims fit one tile each
    return {"BC": pow2(C), "BD": pow2(q.shape[3]), "BV": pow2(v.shape[3])}


def _states(k_feat, v, linear, layout: ChunkLayout):
    """The state and normalizer entering every chunk, `[B * N, H, F, Dv]` and `[B * N, H, F]` (fp32), of the keys
    that enter the linear state."""
    h, hn, _ = chunk_states(k_feat, v, None, layout, key_mask=linear, normalizer=True)
    return h, hn


def still_fwd(q, k, v, q_feat, k_feat, gate, linear, slots, key_valid, config, save):
    """Returns o `[B, T, H, Dv]` (q.dtype) and, when `save`, what the backward reads per query: the max (log2), the
    denominator and the argmax key. Inputs are contiguous and share q's dtype."""
    C, S, scale, eps, salient_block = config
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], q_feat.shape[3]
    layout = chunk_layout(B, T, C, None, q.device)
    h, hn = _states(k_feat, v, linear, layout)
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    m, den, arg = (
        [torch.empty(B, T, H, dtype=dtype, device=q.device) for dtype in (torch.float32, torch.float32, torch.int32)]
        if save
        else (None, None, None)
    )
    still_fwd_kernel[(layout.NT, B * H)](
        q, k, v, q_feat, gate, key_valid, slots, h, hn, o, m, den, arg,
        scale * LOG2E, eps, T, C, layout.NT, S, slots.shape[-1],
        H=H, HKV=Hkv, G=H // Hkv, D=D, DV=Dv, F=F, BS=salient_block, BF=min(64, pow2(F)), **_tiles(q, v, C),
        HAS_KEY_VALID=key_valid is not None, STORE_STATS=save, DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return o, ((m, den, arg) if save else None)


def still_bwd(saved, do, config):
    """Returns dq, dk, dv, dq_feat, dk_feat, dgate in q's dtype."""
    q, k, v, q_feat, k_feat, gate, linear, slots, key_valid, o, m, den, arg = saved
    C, S, scale, eps, salient_block = config
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], q_feat.shape[3]
    layout = chunk_layout(B, T, C, None, q.device)
    h, hn = _states(k_feat, v, linear, layout)
    tiles = _tiles(q, v, C)
    flags = {"HAS_KEY_VALID": key_valid is not None, "DOT_PREC": dot_precision(q.dtype)}

    dq, dq_feat, dgate = (torch.empty_like(x) for x in (q, q_feat, gate))
    e = torch.empty_like(do)
    dden, dm = (torch.empty(B, T, H, dtype=torch.float32, device=q.device) for _ in range(2))
    still_bwd_query_kernel[(layout.NT, B * H)](
        q, k, v, q_feat, gate, key_valid, slots, h, hn, o, do, m, den, arg, dq, dq_feat, dgate, e, dden, dm,
        scale, scale * LOG2E, eps, T, C, layout.NT, S, slots.shape[-1],
        H=H, HKV=Hkv, G=H // Hkv, D=D, DV=Dv, F=F, BS=salient_block, **tiles, **flags,
    )  # fmt: skip
    if key_valid is not None:  # the state gradients multiply every row's features, padding (maybe NaN) included
        q_feat = q_feat.masked_fill(~key_valid.view(B, T, 1, 1).bool(), 0.0)
    dh, dhn, _ = chunk_state_grads(q_feat, e, None, layout, state_heads=H, lag=1, query_weight=dden)
    NS = slots.shape[-1]
    dks = torch.empty(B, H, NS, D, dtype=torch.float32, device=q.device)
    dvs = torch.empty(B, H, NS, Dv, dtype=torch.float32, device=q.device)
    if layout.NT > 2:
        still_bwd_salient_kernel[(layout.NT - 2, B * H)](
            q, k, v, key_valid, slots, do, m, den, arg, dden, dm, dks, dvs, scale * LOG2E, T, C, S, NS,
            H=H, HKV=Hkv, G=H // Hkv, D=D, DV=Dv, BSC=pow2(S), BD=tiles["BD"], BV=tiles["BV"], **flags,
        )  # fmt: skip
    dk_feat = torch.empty_like(k_feat)
    dv_lin = torch.empty(B, T, Hkv, Dv, dtype=torch.float32, device=q.device)
    still_bwd_linear_kernel[(layout.NT, B * Hkv)](
        v, k_feat, linear, key_valid, dh, dhn, dk_feat, dv_lin, T, C, layout.NT,
        H=H, HKV=Hkv, G=H // Hkv, DV=Dv, F=F, BC=tiles["BC"], BV=tiles["BV"], **flags,
    )  # fmt: skip
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    still_bwd_key_kernel[(layout.NT, B * Hkv)](
        q, k, v, key_valid, slots, dks, dvs, dv_lin, do, m, den, arg, dden, dm, dk, dv,
        scale, scale * LOG2E, T, C, layout.NT, S, NS,
        H=H, HKV=Hkv, G=H // Hkv, D=D, DV=Dv, BC=tiles["BC"], BSC=pow2(S), BD=tiles["BD"], BV=tiles["BV"], **flags,
    )  # fmt: skip
    return dq, dk, dv, dq_feat, dk_feat, dgate


class StillAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gate, linear, slots, key_valid, config):
        save = any(ctx.needs_input_grad[:6])
        o, saved = still_fwd(q, k, v, q_feat, k_feat, gate, linear, slots, key_valid, config, save)
        if save:
            ctx.save_for_backward(q, k, v, q_feat, k_feat, gate, linear, slots, key_valid, o, *saved)
        ctx.config = config
        return o

    @staticmethod
    def backward(ctx, do):
        return *still_bwd(ctx.saved_tensors, do.contiguous(), ctx.config), None, None, None, None


def triton_still_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gate: torch.Tensor,
    salient: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    salient_block: int = SALIENT_BLOCK,
) -> torch.Tensor:
    """STILL attention with fused Triton kernels; arguments and returns as in `naive_still_attention`.

    Differentiable w.r.t. q, k, v, q_feat, k_feat and gate; the matmuls run in q's dtype (the model's: pass the
    features in it for tensor cores), gradients come back in their inputs' dtypes. `salient_block` (a power of
    two >= 16) sets how many salient keys a query chunk reads per step, for tests.
    """
    check_inputs(q, k, v, q_feat, k_feat, gate, salient, chunk_size, key_valid)
    if q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, q_feat, k_feat, gate)):
        warnings.warn(UNVERIFIED_BACKWARD, stacklevel=2)
    if salient_block < 16 or salient_block & (salient_block - 1):
        raise ValueError(f"salient_block must be a power of two >= 16, got {salient_block}")
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    linear = ~salient  # the keys that enter the linear state
    if key_valid is not None:
        salient = salient & key_valid[..., None]
        linear = linear & key_valid[..., None]
        key_valid = as_bytes(key_valid)
    slots, S = salient_slots(salient, chunk_size)
    # the keys minus their mean, subtracted in fp32 (exact: the softmax part's logits of a query and their max move by
    # one constant, and the linear part reads k_feat; common/centring.py): the query-side kernel rounds dz to the
    # model dtype before dq = dz k, which cancels a large component the keys share (a k_proj bias): bf16 dq was
    # 0.6 to 1.0 off
    (k,) = centre_keys(k, key_valid)
    # one dtype for the matmul operands (a no-op in the usual case; autograd casts the gradients back)
    k, v, q_feat, k_feat, gate = (x.to(q.dtype) for x in (k, v, q_feat, k_feat, gate))
    q, k, v, q_feat, k_feat, gate = (x.contiguous() for x in (q, k, v, q_feat, k_feat, gate))
    config = (chunk_size, S, scale, float(eps), salient_block)
    return StillAttentionFunction.apply(q, k, v, q_feat, k_feat, gate, as_bytes(linear), slots, key_valid, config)
