"""Blockwise sliding-window attention: each block of queries attends to the keys its window can reach.

A block of Bq queries needs Bq + window - 1 keys, so cost is linear in T and no [T, S] matrix is built.
The keys of all blocks are gathered at once as overlapping views (unfold) of the padded key sequence, and
every block goes through one batched `scaled_dot_product_attention` call with a [Bq, keys] mask: its fused
softmax is about twice as fast on CPU as spelling the attention out, handles GQA without repeating K/V, and
returns zeros for a query that sees no key. SDPA cannot cap logits: with a softcap the same blocks go through
the attention spelled out (`attention`).
"""

import torch
import torch.nn.functional as F


def chunk_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Softmax attention of each query over the last `window` keys up to itself, plus optional sink keys.

    Args:
        q: queries `[B, T, H, D]`; they are the last T of the S key positions.
        k: keys `[B, S, Hkv, D]` with S >= T, shared by H // Hkv query heads.
        v: values `[B, S, Hkv, D]`.
        window: keys visible per query, counting its own token.
        key_valid: `[B, S]` bool, False for keys nobody may see (padding); None means all valid.
        sink_k: extra keys `[B, E, Hkv, D]` outside the window, or None.
        sink_v: extra values `[B, E, Hkv, D]`, or None.
        sink_mask: `[B, T, E]` bool, which extra keys each query sees; None means all of them.
        scale: score multiplier, default D ** -0.5.
        softcap: if set, every score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2).
        block_size: queries per block.

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if T == 0:  # no query: no block to make (a block of min(block_size, T) queries would be empty)
        return q.new_zeros(B, 0, H, v.shape[-1])
    window = min(window, S)  # no query sees more than S keys; keeps blocks small for an "infinite" window
    Bq = min(block_size, T)
    N = -(-T // Bq)
    W = Bq + window - 1  # keys a block of queries can reach
    pad = N * Bq - T

    # block n holds queries n*Bq + r (r < Bq) and keys lo + n*Bq + c (c < W), lo = first key query 0 can see
    if pad:  # F.pad copies even when it pads nothing
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
    q = q.reshape(B, N, Bq, H, D).transpose(2, 3).reshape(B * N, H, Bq, D)
    lo = S - T - window + 1
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    if key_valid is not None:  # a hidden key may hold anything, NaN included, and 0 * NaN would reach o
        k, v = (x.masked_fill(~key_valid[:, :, None, None], 0.0) for x in (k, v))
    # keys before position 0 are padding and must be masked; keys after S only meet padded queries
    valid = F.pad(valid[:, max(lo, 0) :], (max(-lo, 0), pad), value=False).unfold(1, W, Bq)  # [B, N, W]
    k, v = (
        F.pad(x[:, max(lo, 0) :], (0, 0, 0, 0, max(-lo, 0), pad)).unfold(1, W, Bq).permute(0, 1, 2, 4, 3)
        for x in (k, v)
    )  # [B, N, Hkv, W, D]

    r = torch.arange(Bq, device=q.device)[:, None]
    c = torch.arange(W, device=q.device)[None, :]
    mask = (c >= r) & (c < r + window) & valid[:, :, None, :]  # [B, N, Bq, W]
    if sink_k is not None:
        E = sink_k.shape[1]
        sink_k, sink_v = (x.transpose(1, 2)[:, None].expand(B, N, Hkv, E, D) for x in (sink_k, sink_v))
        k, v = torch.cat([k, sink_k], dim=-2), torch.cat([v, sink_v], dim=-2)  # [B, N, Hkv, W + E, D]
        if sink_mask is None:
            sink_mask = torch.ones(B, T, E, dtype=torch.bool, device=q.device)
        mask = torch.cat([mask, F.pad(sink_mask, (0, 0, 0, pad), value=False).view(B, N, Bq, E)], dim=-1)

    o = attention(
        q, k.reshape(B * N, Hkv, -1, D), v.reshape(B * N, Hkv, -1, D), mask.reshape(B * N, 1, Bq, -1), scale, softcap
    )  # [B * N, H, Bq, D]
    return o.view(B, N, H, Bq, D).transpose(2, 3).reshape(B, N * Bq, H, D)[:, :T]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked softmax attention with GQA: `scaled_dot_product_attention`, or spelled out when logits are capped.

    Args:
        q: `[..., H, L, D]`.
        k: `[..., Hkv, S, D]`; query head h reads key head h // (H // Hkv).
        v: `[..., Hkv, S, Dv]`.
        mask: bool, broadcastable to `[..., 1, L, S]` (one mask for all heads), or None.
        scale: logit multiplier, default D ** -0.5.
        softcap: if set, every logit z becomes softcap * tanh(z / softcap) before the softmax (SDPA cannot do
            that: the logits are then computed here, in fp32 at least). Without it, SDPA computes in the inputs'
            dtype, or in fp32 at least where autograd will differentiate it.

    Returns:
        `[..., H, L, Dv]` in q.dtype; zeros for a query that sees no key.
    """
    if softcap is None:
        out_dtype = q.dtype
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            # SDPA's half-precision backward rounds the score gradients ds to the input dtype before dq = ds k sums
            # them; the score gradients of a query sum to zero, so that sum cancels whatever the keys share (a k_proj
            # bias: |k| in the hundreds in some channels of Qwen2.5), and bf16 dq came out 10-20% off. Differentiated,
            # SDPA runs in fp32 (on a CPU no slower than its bf16 backward); the forward alone keeps the input dtype.
            q, k, v = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).to(out_dtype)
    *lead, H, L, D = q.shape
    Hkv, out_dtype = k.shape[-3], q.dtype
    scale = D**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = q.to(dtype).reshape(*lead, Hkv, H // Hkv, L, D)
    k, v = (x.to(dtype).unsqueeze(-3) for x in (k, v))  # [..., Hkv, 1, S, D]
    z = q @ k.mT * scale
    z = softcap * torch.tanh(z / softcap)  # [..., Hkv, G, L, S]
    if mask is None:
        p = z.softmax(-1)
    else:
        mask = mask.unsqueeze(-3)  # [..., 1, 1, L, S]
        p = z.masked_fill(~mask, float("-inf")).softmax(-1)
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN
    return (p @ v).reshape(*lead, H, L, v.shape[-1]).to(out_dtype)
