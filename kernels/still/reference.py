"""STILL oracles: full [T, T] masks in float64, written to be obviously correct.

Also holds what every path shares: the input checks, the zeroing of invalid positions and the smoothed-KL
formula of the self-saliency score (docs/methods.md §3.2).
"""

import torch

SALIENCY_EPS = 1e-8  # the epsilon of the official smoothing


def _expect(name: str, x: torch.Tensor, shape: tuple, dims: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"expected {name} {dims} = {tuple(shape)}, got {tuple(x.shape)}")


def check_qk(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    """Raise a ValueError unless q is `[B, T, H, D]`, k `[B, T, Hkv, D]` with H % Hkv == 0 and key_valid `[B, T]`."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B, T, H, D] and k [B, T, Hkv, D], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"expected H a multiple of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    _expect("k", k, (B, T, Hkv, D), "[B, T, Hkv, D]")
    if key_valid is not None:
        _expect("key_valid", key_valid, (B, T), "[B, T]")


def check_saliency_inputs(q, k, window, key_valid=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `self_saliency`."""
    check_qk(q, k, key_valid)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def check_inputs(q, k, v, q_feat, k_feat, gate, salient, chunk_size, key_valid=None) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `still_attention`."""
    check_qk(q, k, key_valid)
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    if v.dim() != 4 or q_feat.dim() != 4:
        raise ValueError(f"expected v and q_feat 4-d, got v {tuple(v.shape)}, q_feat {tuple(q_feat.shape)}")
    Dv, F = v.shape[-1], q_feat.shape[-1]
    _expect("v", v, (B, T, Hkv, Dv), "[B, T, Hkv, Dv]")
    _expect("q_feat", q_feat, (B, T, H, F), "[B, T, H, F]")
    _expect("k_feat", k_feat, (B, T, H, F), "[B, T, H, F]")
    _expect("gate", gate, (B, T, H, Dv), "[B, T, H, Dv]")
    _expect("salient", salient, (B, T, H), "[B, T, H]")
    if salient.dtype != torch.bool:
        raise ValueError(f"expected salient of dtype torch.bool, got {salient.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def zero_invalid(x: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`x` `[B, T, ...]` cast to dtype, zero at invalid positions.

    Padding may hold anything (NaN included); zeroing it keeps it out of every product, in both the forward
    and the backward pass, where masking the products alone would still let 0 * NaN through.
    """
    x = x.to(dtype)
    if key_valid is None:
        return x
    return x.masked_fill(~key_valid.view(*key_valid.shape, *[1] * (x.dim() - 2)), 0.0)


def _masked_softmax(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of z over the last dim where mask is True; zeros for a row without any True."""
    p = z.masked_fill(~mask, float("-inf")).softmax(-1)
    return p.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # all -inf rows gave NaN


def smoothed_self_kl(z: torch.Tensor, in_window: torch.Tensor, is_self: torch.Tensor, window: int) -> torch.Tensor:
    """Self-saliency score: smoothed KL between the window softmax with and without the query's own key.

    Args:
        z: logits `[..., K]` of one query against K candidate keys.
        in_window: `[..., K]` bool (broadcastable), the keys of the query's window W_t.
        is_self: `[..., K]` bool (broadcastable), the query's own key (the true self slot).
        window: l, the nominal window length, used as the constant even when W_t is shorter.

    Returns:
        Scores `[...]`, summed over the keys in the window only.
    """
    eps = SALIENCY_EPS
    diag = (_masked_softmax(z, in_window) + eps) / (1 + window * eps)
    nodiag = (_masked_softmax(z, in_window & ~is_self) + eps) / (1 + window * eps + 1 / window)
    # the removed self term gets the uniform mass 1/l (quirk Q1 fixed: the true self slot, in every path)
    nodiag = nodiag.masked_fill(is_self, 1 / window + eps)
    return torch.where(in_window, diag * torch.log(diag / (nodiag + eps)), 0.0).sum(-1)


@torch.no_grad()
def naive_self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-saliency score of every token over its window of the last `window` valid keys (itself included).

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        window: l, keys the window reaches back, counting the token itself.
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.

    Returns:
        Detached fp32 scores `[B, T, H]`, -inf at invalid positions.
    """
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    q, k = (zero_invalid(x, key_valid, torch.float64) for x in (q, k))
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    z = torch.einsum("bthd,bjhd->bhtj", q, k) * scale  # [B, H, T, T]
    t = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= t) & (j > t - window) & valid[:, None, None, :]  # [B, 1, T, T]
    scores = smoothed_self_kl(z, in_window, j == t, window)  # [B, H, T]
    return scores.masked_fill(~valid[:, None], float("-inf")).transpose(1, 2).float()


def still_masks(salient: torch.Tensor, chunk_size: int, key_valid: torch.Tensor | None):
    """Which keys each query reads exactly (softmax) and which through the linear state.

    Args:
        salient: `[B, T, H]` bool.
        chunk_size: C; chunk(j) = j // C.
        key_valid: `[B, T]` bool or None.

    Returns:
        soft, lin: `[B, H, T, T]` bool over (query t, key j); disjoint, and together every valid j <= t.
    """
    B, T, H = salient.shape
    t = torch.arange(T, device=salient.device)[:, None]
    j = torch.arange(T, device=salient.device)[None, :]
    causal = (j <= t).expand(B, 1, T, T)
    if key_valid is not None:
        causal = causal & key_valid[:, None, None, :]
    recent = j // chunk_size >= t // chunk_size - 1  # the key's chunk is the query's or the one before
    kept = recent | salient.transpose(1, 2)[:, :, None, :]  # [B, H, T, T]
    return causal & kept, causal & ~kept


def naive_still_attention(
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
) -> torch.Tensor:
    """STILL hybrid attention: exact softmax over the salient and recent keys, gated linear attention over the rest.

    o_t = (sum_S e^(z_tj - m_t) v_j + gate_t * sum_N (q_feat_t . k_feat_j) v_j)
          / (sum_S e^(z_tj - m_t) + sum_N q_feat_t . k_feat_j + eps),  m_t = max_S z_tj  (see `still_masks`).

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, Dv]`.
        q_feat: query features `[B, T, H, F]`, positive.
        k_feat: key features `[B, T, H, F]`, positive, per query head.
        gate: output gate of the linear numerator `[B, T, H, Dv]`.
        salient: `[B, T, H]` bool, keys kept exact once their chunk is two chunks behind the query's.
        chunk_size: C; chunk(j) = j // C.
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        eps: added to the denominator.

    Returns:
        o `[B, T, H, Dv]` in q.dtype.
    """
    D = q.shape[-1]
    group = q.shape[2] // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, q_feat, k_feat, gate = (zero_invalid(x, key_valid, torch.float64) for x in (q, k, v, q_feat, k_feat, gate))
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    soft, lin = still_masks(salient, chunk_size, key_valid)  # [B, H, T, T]

    z = torch.einsum("bthd,bjhd->bhtj", q, k) * scale
    z = z.masked_fill(~soft, float("-inf"))
    m = z.amax(-1, keepdim=True)
    p = torch.exp(z - m.masked_fill(m == float("-inf"), 0.0))  # a padded query may have no key
    w = torch.einsum("bthf,bjhf->bhtj", q_feat, k_feat).masked_fill(~lin, 0.0)

    num = torch.einsum("bhtj,bjhd->bthd", p, v) + gate * torch.einsum("bhtj,bjhd->bthd", w, v)
    den = (p.sum(-1) + w.sum(-1)).transpose(1, 2)  # [B, T, H]
    return (num / (den + eps)[..., None]).to(dtype)
