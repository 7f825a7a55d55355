"""Sliding-window attention oracle: the full [T, S + E] mask, fp32, written to be obviously correct."""

import torch


def naive_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    scale: float | None = None,
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

    Returns:
        o `[B, T, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    group = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    i = torch.arange(S - T, S, device=q.device)[:, None]  # absolute index of each query
    j = torch.arange(S, device=q.device)[None, :]
    mask = ((j <= i) & (j > i - window)).expand(B, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    if sink_k is not None:
        if sink_mask is None:
            sink_mask = torch.ones(B, T, sink_k.shape[1], dtype=torch.bool, device=q.device)
        k, v = torch.cat([k, sink_k], dim=1), torch.cat([v, sink_v], dim=1)
        mask = torch.cat([mask, sink_mask], dim=-1)
    k, v = (x.float().repeat_interleave(group, dim=2) for x in (k, v))
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k) * scale
    p = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    p = p.masked_fill(~mask[:, None].any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN
    return torch.einsum("bhts,bshd->bthd", p, v).to(q.dtype)
