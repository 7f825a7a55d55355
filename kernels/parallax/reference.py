"""Parallax oracles: full [T, P + T] masks in the inputs' precision (at least fp32), written to be obviously correct;
plus the input checks every path shares."""

import torch


def _fail(expected: str, **tensors: torch.Tensor | None) -> None:
    got = ", ".join(f"{name} {None if x is None else tuple(x.shape)}" for name, x in tensors.items())
    raise ValueError(f"expected {expected}; got {got}")


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be None (unlimited) or >= 1, got {window}")


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...], dims: str) -> None:
    if mask is not None and (tuple(mask.shape) != shape or mask.dtype != torch.bool):
        raise ValueError(f"expected {name} {dims} = {shape} bool, got {tuple(mask.shape)} {mask.dtype}")


def check_inputs(q, r, k, v, window=None, key_valid=None, past_k=None, past_v=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `parallax_attention`."""
    expected = (
        "q and r [B, T, H, D], k and v [B, T, Hkv, D] with H % Hkv == 0, past_k and past_v [B, P, Hkv, D] "
        "(both or neither)"
    )
    if q.dim() != 4 or k.dim() != 4:
        _fail(expected, q=q, k=k)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    P = 0 if past_k is None else past_k.shape[1]
    ok = (
        Hkv >= 1
        and H % Hkv == 0
        and r.shape == q.shape
        and k.shape == v.shape == (B, T, Hkv, D)
        and (past_k is None) == (past_v is None)
        and (past_k is None or past_k.shape == past_v.shape == (B, P, Hkv, D))
    )
    if not ok:
        _fail(expected, q=q, r=r, k=k, v=v, past_k=past_k, past_v=past_v)
    _check_window(window)
    _check_mask("key_valid", key_valid, (B, P + T), "[B, P + T]")


def check_decode_inputs(q, r, k_cache, v_cache, cache_valid=None, window=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `parallax_decode`."""
    expected = "q and r [B, H, D], k_cache and v_cache [B, L, Hkv, D] with L >= 1 and H % Hkv == 0"
    if q.dim() != 3 or k_cache.dim() != 4:
        _fail(expected, q=q, k_cache=k_cache)
    B, H, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    ok = L >= 1 and Hkv >= 1 and H % Hkv == 0 and r.shape == q.shape
    if not (ok and k_cache.shape == v_cache.shape == (B, L, Hkv, D)):
        _fail(expected, q=q, r=r, k_cache=k_cache, v_cache=v_cache)
    _check_window(window)
    _check_mask("cache_valid", cache_valid, (B, L), "[B, L]")


def with_history(k, v, past_k, past_v) -> tuple[torch.Tensor, torch.Tensor]:
    """All keys and values `[B, P + T, Hkv, D]`: the history, then the new tokens (autograd reaches both)."""
    if past_k is None:
        return k, v
    return torch.cat([past_k, k.to(past_k.dtype)], dim=1), torch.cat([past_v, v.to(past_v.dtype)], dim=1)


def _parallax(q, r, k, v, mask, scale, softcap=None):
    """o `[B, Hq, D]` of queries q, r `[B, Hq, D]` over keys k, v `[B, Hq, S, D]` (GQA expanded) visible where
    mask `[B, Hq, S]` (broadcastable); zeros for a query that sees no key. softcap caps the softmax logits z only."""
    # a hidden key may hold anything, NaN included, and 0 * NaN would reach o (through p * s as well as p @ v)
    k, v = (x.masked_fill(~mask[..., None], 0.0) for x in (k, v))
    z = torch.einsum("bhd,bhsd->bhs", q, k) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    s = torch.einsum("bhd,bhsd->bhs", r, k)
    p = z.masked_fill(~mask, float("-inf")).softmax(-1)
    p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN
    t_bar = (p * s).sum(-1, keepdim=True)
    return torch.einsum("bhs,bhsd->bhd", p * (1 + t_bar - s), v)


def naive_parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Parallax attention over a sequence (optionally continuing cached history), one query at a time.

    Args:
        q: queries `[B, T, H, D]`.
        r: probes `[B, T, H, D]`.
        k: keys `[B, T, Hkv, D]`; query head h reads key head h // (H // Hkv).
        v: values `[B, T, Hkv, D]`.
        scale: multiplier of q . k (r . k is unscaled), default D ** -0.5.
        softcap: if set, the softmax logits z = scale q . k become softcap * tanh(z / softcap) (Gemma 2); the
            probe term r . k is not capped.
        window: keys visible per query, counting its own token; None means all earlier keys.
        key_valid: `[B, P + T]` bool, False for keys nobody may see (padding); None means all valid.
        past_k: keys of the P cached tokens before these `[B, P, Hkv, D]`, or None.
        past_v: their values `[B, P, Hkv, D]`, given together with past_k.

    Returns:
        o `[B, T, H, D]` in q.dtype, computed in fp32 (float64 for float64 inputs); zeros for a query that sees
        no key.
    """
    check_inputs(q, r, k, v, window, key_valid, past_k, past_v)
    B, T, H, D = q.shape
    keys, values = with_history(k, v, past_k, past_v)
    S, G = keys.shape[1], H // k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    window = S if window is None else window
    keys, values = (x.to(dtype).repeat_interleave(G, dim=2).transpose(1, 2) for x in (keys, values))  # [B, H, S, D]
    j = torch.arange(S, device=q.device)
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    o = []
    for t in range(T):
        i = S - T + t  # the query's own key position
        mask = (valid & (j <= i) & (j > i - window))[:, None, :]  # [B, 1, S]
        o.append(_parallax(q[:, t].to(dtype), r[:, t].to(dtype), keys, values, mask, scale, softcap))
    return torch.stack(o, dim=1).to(q.dtype)


def naive_parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One Parallax decode step: one new query per sequence over its cache.

    Args:
        q: queries `[B, H, D]` of the new token.
        r: probes `[B, H, D]`.
        k_cache: keys `[B, L, Hkv, D]`, the new token's last; query head h reads key head h // (H // Hkv).
        v_cache: values `[B, L, Hkv, D]`.
        cache_valid: `[B, L]` bool, False for slots nobody may see (padding, unfilled); None means all valid.
        scale: multiplier of q . k, default D ** -0.5.
        softcap: if set, the softmax logits z = scale q . k become softcap * tanh(z / softcap) (Gemma 2).
        window: the last `window` slots are visible; None means all.

    Returns:
        o `[B, H, D]` in q.dtype; zeros for a query that sees no key.
    """
    check_decode_inputs(q, r, k_cache, v_cache, cache_valid, window)
    B, H, D = q.shape
    L, G = k_cache.shape[1], H // k_cache.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    window = L if window is None else window
    keys, values = (x.to(dtype).repeat_interleave(G, dim=2).transpose(1, 2) for x in (k_cache, v_cache))
    mask = torch.arange(L, device=q.device) >= L - window
    if cache_valid is not None:
        mask = mask & cache_valid
    mask = mask.expand(B, L)[:, None, :]  # [B, 1, L]
    return _parallax(q.to(dtype), r.to(dtype), keys, values, mask, scale, softcap).to(q.dtype)
