"""Sliding-window attention oracle: the full [T, S + E] mask, fp32, written to be obviously correct."""

import torch


def check_inputs(q, k, v, window, key_valid=None, sink_k=None, sink_v=None, sink_mask=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit the op's shapes (see the dispatcher)."""
    if any(x.ndim != 4 for x in (q, k, v)):
        raise ValueError(
            f"expected 4-D q, k and v [B, T, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv or S < T or v.shape != k.shape or k.shape != (B, S, Hkv, D):
        raise ValueError(
            "expected q [B, T, H, D], k and v [B, S, Hkv, D] with S >= T and H % Hkv == 0, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if (sink_k is None) != (sink_v is None) or (sink_k is None and sink_mask is not None):
        raise ValueError("sink_k and sink_v go together, and sink_mask needs them")
    if key_valid is not None and (key_valid.shape != (B, S) or key_valid.dtype != torch.bool):
        raise ValueError(f"expected key_valid [B, S] = {(B, S)} bool, got {tuple(key_valid.shape)} {key_valid.dtype}")
    if sink_k is not None:
        E = sink_k.shape[1]
        if sink_k.shape != (B, E, Hkv, D) or sink_v.shape != sink_k.shape:
            raise ValueError(f"expected sink_k and sink_v [B, E, Hkv, D], got {tuple(sink_k.shape)}")
        if sink_mask is not None and sink_mask.shape != (B, T, E):
            raise ValueError(f"expected sink_mask [B, T, E] = {(B, T, E)}, got {tuple(sink_mask.shape)}")


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
    softcap: float | None = None,
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
    if key_valid is not None:  # a hidden key may hold anything, NaN included, and 0 * NaN would reach o
        mask = mask & key_valid[:, None, :]
        k, v = (x.masked_fill(~key_valid[:, :, None, None], 0.0) for x in (k, v))
    if sink_k is not None:
        if sink_mask is None:
            sink_mask = torch.ones(B, T, sink_k.shape[1], dtype=torch.bool, device=q.device)
        k, v = torch.cat([k, sink_k], dim=1), torch.cat([v, sink_v], dim=1)
        mask = torch.cat([mask, sink_mask], dim=-1)
    k, v = (x.float().repeat_interleave(group, dim=2) for x in (k, v))
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    p = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    p = p.masked_fill(~mask[:, None].any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN
    return torch.einsum("bhts,bshd->bthd", p, v).to(q.dtype)
