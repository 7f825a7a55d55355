"""Blockwise sliding-window attention: each block of queries attends to the keys its window can reach.

A block of Bq queries needs Bq + window - 1 keys, so cost is linear in T and no [T, S] matrix is built.
The keys of all blocks are gathered at once as overlapping views (unfold) of the padded key sequence.
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
        block_size: queries per block.

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dtype = q.dtype
    scale = D**-0.5 if scale is None else scale
    window = min(window, S)  # no query sees more than S keys; keeps blocks small for an "infinite" window
    Bq = min(block_size, T)
    N = -(-T // Bq)
    W = Bq + window - 1  # keys a block of queries can reach
    pad = N * Bq - T

    # block n holds queries n*Bq + r (r < Bq) and keys lo + n*Bq + c (c < W), lo = first key query 0 can see
    q = F.pad(q.float() * scale, (0, 0, 0, 0, 0, pad)).view(B, N, Bq, Hkv, G, D)
    q = q.permute(0, 3, 1, 4, 2, 5).reshape(B, Hkv, N, G * Bq, D)
    lo = S - T - window + 1
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    # keys before position 0 are padding and must be masked; keys after S only meet padded queries
    valid = F.pad(valid[:, max(lo, 0) :], (max(-lo, 0), pad), value=False).unfold(1, W, Bq)  # [B, N, W]
    k, v = (F.pad(x[:, max(lo, 0) :].float(), (0, 0, 0, 0, max(-lo, 0), pad)).permute(0, 2, 1, 3) for x in (k, v))
    k_t, v = k.unfold(2, W, Bq), v.unfold(2, W, Bq).transpose(-1, -2)  # [B, Hkv, N, D, W], [B, Hkv, N, W, D]

    r = torch.arange(Bq, device=q.device)[:, None]
    c = torch.arange(W, device=q.device)[None, :]
    mask = (c >= r) & (c < r + window) & valid[:, :, None, :]  # [B, N, Bq, W]
    if sink_k is not None:
        # sinks join every block's keys: copying E keys per block is cheaper than concatenating scores
        E = sink_k.shape[1]
        sink_k, sink_v = (x.float().permute(0, 2, 1, 3).unsqueeze(2).expand(B, Hkv, N, E, D) for x in (sink_k, sink_v))
        k_t = torch.cat([k_t, sink_k.transpose(-1, -2)], dim=-1)  # [B, Hkv, N, D, W + E]
        v = torch.cat([v, sink_v], dim=-2)  # [B, Hkv, N, W + E, D]
        if sink_mask is None:
            sink_mask = torch.ones(B, T, E, dtype=torch.bool, device=q.device)
        mask = torch.cat([mask, F.pad(sink_mask, (0, 0, 0, pad), value=False).view(B, N, Bq, E)], dim=-1)

    scores = (q @ k_t).view(B, Hkv, N, G, Bq, -1)  # [B, Hkv, N, G, Bq, W (+ E)]
    # in place: the matmul does not need its output for backward, and a copy of the scores costs as much
    # as the masking; a row with no visible key gets a uniform (finite) softmax and is zeroed below
    scores.masked_fill_(~mask[:, None, :, None], torch.finfo(torch.float32).min)
    o = (scores.softmax(-1).view(B, Hkv, N, G * Bq, -1) @ v).view(B, Hkv, N, G, Bq, D)
    o.masked_fill_(~mask.any(-1)[:, None, :, None, :, None], 0.0)
    return o.permute(0, 2, 4, 1, 3, 5).reshape(B, N * Bq, H, D)[:, :T].to(dtype)
