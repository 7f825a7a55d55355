"""Fused Liger decode step in Triton: gated linear state update and readout, window softmax and the mix.

One program per (batch row, key head) serves the G = H // Hkv query heads that share the key head, so the
fp32 state block `[K, V]` is read and written exactly once and the window keys and values once:

1. window scores of the G query heads against the W window keys (invalid keys masked) and their softmax,
   kept as probabilities `[G, W]` (a query that sees no key gets all-zero probabilities, hence a zero output);
2. for each V tile: load the state tile `[K, BLOCK_V]`, decay it and add k v^T, store it as the new state,
   and for each query head read it out with q_lin, take the window values' weighted sum and store the mix.

Forward only: decoding needs no gradient.
"""

import torch
import triton
import triton.language as tl

from ..common.launch import as_bytes
from .reference import MAX_WINDOW  # every tile spans the whole window, so the window is bounded

# fp32 values per state tile `[K, BLOCK_V]` and per window key tile `[W, BLOCK_D]`. With 8 warps and the query
# heads in a runtime loop this compiles without register spills for G <= 16, D <= 256, W <= 128 (sm_80 and sm_90,
# Triton 3.9 AOT to cubin, ptxas -v); 4096, 4 warps or unrolled head loops spill.
TILE = 2048


@triton.jit
def liger_decode_kernel(
    q_lin_ptr,  # [B, H, K]
    k_lin_ptr,  # [B, Hkv, K]
    v_ptr,  # [B, Hkv, V]
    g_ptr,  # [B, Hkv, K]
    state_ptr,  # [B, Hkv, K, V]
    q_rot_ptr,  # [B, H, D]
    wk_ptr,  # [B, W, Hkv, D]
    wv_ptr,  # [B, W, Hkv, V]
    valid_ptr,  # [B, W] uint8
    o_ptr,  # [B, H, V]
    new_state_ptr,  # [B, Hkv, K, V] fp32
    stride_ql_b,
    stride_ql_h,
    stride_kl_b,
    stride_kl_h,
    stride_v_b,
    stride_v_h,
    stride_g_b,
    stride_g_h,
    stride_s_b,
    stride_s_h,
    stride_s_k,
    stride_qr_b,
    stride_qr_h,
    stride_wk_b,
    stride_wk_w,
    stride_wk_h,
    stride_wv_b,
    stride_wv_w,
    stride_wv_h,
    stride_m_b,
    stride_o_b,
    stride_o_h,
    stride_n_b,
    stride_n_h,
    stride_n_k,
    Hkv,
    K,
    V,
    D,
    W,
    scale,
    mix,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # last dims of every tensor are contiguous (the host makes sure). Batch and head offsets are int64 and go
    # into scalar base pointers; offsets inside one head's block are int32 and built inside the loops, so no
    # loop-invariant 2-D pointer tensor is kept live across them.
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    kv = (pid % Hkv).to(tl.int64)
    h0 = kv * G  # first query head of the group
    q_lin_ptr += b * stride_ql_b + h0 * stride_ql_h
    k_lin_ptr += b * stride_kl_b + kv * stride_kl_h
    v_ptr += b * stride_v_b + kv * stride_v_h
    g_ptr += b * stride_g_b + kv * stride_g_h
    state_ptr += b * stride_s_b + kv * stride_s_h
    q_rot_ptr += b * stride_qr_b + h0 * stride_qr_h
    wk_ptr += b * stride_wk_b + kv * stride_wk_h
    wv_ptr += b * stride_wv_b + kv * stride_wv_h
    valid_ptr += b * stride_m_b
    o_ptr += b * stride_o_b + h0 * stride_o_h
    new_state_ptr += b * stride_n_b + kv * stride_n_h

    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_g = offs_g < G
    mask_k = offs_k < K
    mask_w = offs_w < W

    # ---- window softmax of the G query heads: probabilities [BLOCK_G, BLOCK_W] ----
    valid = tl.load(valid_ptr + offs_w, mask=mask_w, other=0) != 0  # [BLOCK_W]
    scores = tl.zeros((BLOCK_G, BLOCK_W), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # tiles of the head dim
        cols = d0 + offs_d
        mask_d = cols < D
        # invalid keys are never loaded, so garbage (even NaN) in unused cache slots cannot leak in
        keys = tl.load(
            wk_ptr + offs_w[:, None] * stride_wk_w + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_W, BLOCK_D]
        for i in range(G):
            q = tl.load(q_rot_ptr + i * stride_qr_h + cols, mask=mask_d, other=0.0).to(tl.float32)
            s = tl.sum(keys * q[None, :], axis=1)  # [BLOCK_W]
            scores += tl.where(offs_g[:, None] == i, s[None, :], 0.0)
    seen = mask_g[:, None] & valid[None, :]  # [BLOCK_G, BLOCK_W]
    scores = tl.where(seen, scores * scale, float("-inf"))
    m = tl.max(scores, axis=1)  # -inf for a query that sees no key
    m = tl.where(m > float("-inf"), m, 0.0)
    p = tl.where(seen, tl.exp(scores - m[:, None]), 0.0)
    denom = tl.sum(p, axis=1)
    p = p / tl.where(denom > 0.0, denom, 1.0)[:, None]  # p stays an all-zero row when nothing is visible

    # ---- linear branch: decay and k v^T of the key head, tile by tile over V ----
    k_lin = tl.load(k_lin_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        mask_v = cols < V
        mask_kv = mask_k[:, None] & mask_v[None, :]
        state = tl.load(state_ptr + offs_k[:, None] * stride_s_k + cols[None, :], mask=mask_kv, other=0.0)
        val = tl.load(v_ptr + cols, mask=mask_v, other=0.0).to(tl.float32)
        state = decay[:, None] * state.to(tl.float32) + k_lin[:, None] * val[None, :]  # [BLOCK_K, BLOCK_V]
        tl.store(new_state_ptr + offs_k[:, None] * stride_n_k + cols[None, :], state, mask=mask_kv)
        values = tl.load(
            wv_ptr + offs_w[:, None] * stride_wv_w + cols[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_W, BLOCK_V]
        for i in range(G):
            q = tl.load(q_lin_ptr + i * stride_ql_h + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            o_linear = tl.sum(q[:, None] * state, axis=0)  # [BLOCK_V]
            p_i = tl.sum(tl.where(offs_g[:, None] == i, p, 0.0), axis=0)  # [BLOCK_W]
            o_window = tl.sum(p_i[:, None] * values, axis=0)  # [BLOCK_V]
            o = mix * o_window + (1.0 - mix) * o_linear
            tl.store(o_ptr + i * stride_o_h + cols, o.to(o_ptr.dtype.element_ty), mask=mask_v)


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(n), max(16, cap))


def triton_liger_decode(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    q_rot: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    window_valid: torch.Tensor,
    scale: float | None = None,
    mix: float = 0.5,
    block_v: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Liger decode step in one kernel launch; arguments and returns as in `naive_liger_decode`.

    `block_v` and `block_d` (powers of two >= 16) override the V and head-dim tile sizes, for tests; by default
    a state tile holds about `TILE` fp32 values and a window key tile too.
    """
    B, H, K = q_lin.shape
    Hkv, V = v.shape[1], v.shape[2]
    D, W = q_rot.shape[2], window_k.shape[1]
    if W > MAX_WINDOW:
        raise ValueError(f"the Triton Liger decode kernel holds at most {MAX_WINDOW} window keys, got {W}")
    scale = D**-0.5 if scale is None else scale
    # the kernel indexes the last dim of every tensor with unit stride
    q_lin, k_lin, v, g, state, q_rot, window_k, window_v = (
        x if x.stride(-1) == 1 else x.contiguous() for x in (q_lin, k_lin, v, g, state, q_rot, window_k, window_v)
    )
    valid = as_bytes(window_valid)
    o = torch.empty(B, H, V, dtype=q_rot.dtype, device=q_rot.device)
    new_state = torch.empty(B, Hkv, K, V, dtype=torch.float32, device=q_rot.device)
    BLOCK_K, BLOCK_W = triton.next_power_of_2(K), max(16, triton.next_power_of_2(W))
    BLOCK_V = block_v or _block(V, TILE // BLOCK_K)
    BLOCK_D = block_d or _block(D, TILE // BLOCK_W)
    num_warps = 8 if max(BLOCK_K * BLOCK_V, BLOCK_W * BLOCK_D) >= TILE else 4
    G = H // Hkv
    liger_decode_kernel[(B * Hkv,)](
        q_lin, k_lin, v, g, state, q_rot, window_k, window_v, valid, o, new_state,
        q_lin.stride(0), q_lin.stride(1),
        k_lin.stride(0), k_lin.stride(1),
        v.stride(0), v.stride(1),
        g.stride(0), g.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        q_rot.stride(0), q_rot.stride(1),
        window_k.stride(0), window_k.stride(1), window_k.stride(2),
        window_v.stride(0), window_v.stride(1), window_v.stride(2),
        valid.stride(0),
        o.stride(0), o.stride(1),
        new_state.stride(0), new_state.stride(1), new_state.stride(2),
        Hkv, K, V, D, W,
        float(scale), float(mix),
        G=G,
        BLOCK_G=triton.next_power_of_2(G),
        BLOCK_K=BLOCK_K,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
        BLOCK_W=BLOCK_W,
        num_warps=num_warps,
    )  # fmt: skip
    return o, new_state
