"""STILL (Selecting Tokens for Intra-Layer Hybrid attention, docs/methods.md §3): self-saliency scores, top-k
selection and the hybrid attention, and their dispatchers. Each op has a "reference" path (float64 oracles with
full [T, T] masks; the selection's reference is its torch path), a "torch" path (blockwise PyTorch, no [T, T]
matrix) and a "triton" path (fused kernels, the attention with its own backward; CUDA tensors default to it). The
Triton modules are imported only when the "triton" backend runs, so CPU-only installs never import triton.

Semantics (our choices where the official code has quirks). Layouts are `[B, T, H, D]`; k and v have Hkv heads,
H a multiple of Hkv, and query head h reads kv head h // (H // Hkv) (K/V are never repeated by the caller).
`key_valid` `[B, T]` is False at padding, wherever it is: an invalid position is never a key for anyone, and the
output at an invalid query is unspecified but finite. Chunks are aligned to index 0: chunk(j) = j // chunk_size.
z_tj = scale * q_t . k_j with scale = D ** -0.5 by default, in every path (quirk Q2 fixed).

1. `self_saliency`: the window W_t = valid j with t - window < j <= t; a^diag = softmax over W_t of z_t,
   a^nodiag = softmax over W_t without t (all zeros when empty); with l = window (constant, even when W_t is
   shorter) and eps = 1e-8: ad = (a^diag + eps) / (1 + l eps), and = (a^nodiag + eps) / (1 + l eps + 1/l),
   then and_t := 1/l + eps at the TRUE self slot (quirk Q1 fixed); S_t = sum over W_t of ad log(ad / (and + eps)).
   Essentially a function of the self weight alpha_t = a^diag_tt (~0 at 1/l, 1.39 at 0.5, 3.42 at 0.9 for l = 64).
   -inf at invalid positions; not differentiated (the selection is discrete). Never soft-capped (the attention
   ops' `softcap`, Gemma 2): the score only ranks tokens.
2. `select_salient`: per chunk, batch row and head, the topk HIGHEST finite scores (all if fewer). Equal scores
   may be broken differently by the torch and Triton paths.
3. `still_attention`: for query t in chunk c and head h,
   S_t = {valid j: chunk(j) <= c-2, salient[j, h]} + {valid j: chunk(j) = c-1} + {valid j: chunk(j) = c, j <= t},
   N_t = {valid j: chunk(j) <= c-2, not salient[j, h]}, m_t = max over S_t of z_tj, and
   o_t = (sum_S e^(z_tj - m_t) v_j + gate_t * sum_N (q_feat_t . k_feat_j) v_j)
         / (sum_S e^(z_tj - m_t) + sum_N q_feat_t . k_feat_j + eps),
   z_tj capped to softcap * tanh(z_tj / softcap) first when a softcap is given (the linear part has no logits).
   The max shift applies to the softmax terms only and the gate to the linear numerator only, as the official
   code does (quirk Q5, reproduced), so the output depends on m_t and the gradient flows through the max too.
   Gradients reach q, k, v, q_feat, k_feat and gate; no cache inputs.
4. `still_decode`: one new token per row against the decode cache (`StillDecodeState`: a ring of the last two
   chunks, the queries of the newest chunk, the salient keys of older chunks, the linear state), with the selection
   delayed to chunk granularity: a token that opens chunk c (c >= 1) first scores chunk c - 1, now complete, and
   (c >= 2) moves chunk c - 2 out of the ring (its top-k per head, by their own scores, join the salient cache, the
   others fold into the state), so that each step's output is what 3. gives the last token of the sequence
   (docs/methods.md §3.6). A "reference" path (fp32, row by row) and a "torch" one; the "triton" backend runs
   the torch step with the Triton selection of `select_salient`.
"""

from collections.abc import Callable

import torch

from ..backend import outside_autocast, resolve_backend, softcap_unsupported
from .chunk import chunk_self_saliency, chunk_still_attention
from .decode import torch_still_decode
from .reference import (
    StillDecodeState,
    check_decode_inputs,
    check_inputs,
    check_saliency_inputs,
    naive_self_saliency,
    naive_still_attention,
    naive_still_decode,
)
from .selection import check_selection_inputs, torch_select_salient

__all__ = [
    "StillDecodeState",
    "chunk_self_saliency",
    "chunk_still_attention",
    "naive_self_saliency",
    "naive_still_attention",
    "naive_still_decode",
    "select_salient",
    "self_saliency",
    "still_attention",
    "still_decode",
    "torch_select_salient",
    "torch_still_decode",
]


@outside_autocast
def self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Self-saliency score of every token: smoothed KL between its window attention with and without itself.

    Its logits are never soft-capped (there is no `softcap` here, unlike the attention ops): the score only ranks
    the tokens of a chunk, in prefill and decode alike.

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`; H must be a multiple of Hkv.
        window: l, keys the window reaches back, counting the token itself (>= 1).
        scale: logit multiplier, default D ** -0.5.
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`).

    Returns:
        Detached fp32 scores `[B, T, H]`, -inf at invalid positions.
    """
    check_saliency_inputs(q, k, window, key_valid)
    name = resolve_backend(backend, q.device, available=("reference", "torch", "triton"))
    if name == "reference":
        score = naive_self_saliency
    elif name == "torch":
        score = chunk_self_saliency
    else:
        from .saliency_triton import triton_self_saliency as score
    return score(q, k, window, scale, key_valid)


def select_salient(
    scores: torch.Tensor, *, chunk_size: int = 64, topk: int = 4, backend: str | None = None
) -> torch.Tensor:
    """Mark the `topk` highest-scored valid tokens of every chunk, per batch row and head (quirk Q3: the highest,
    as the official code keeps); a chunk with fewer valid tokens keeps all of them.

    Args:
        scores: `[B, T, H]` saliency scores, -inf at invalid positions.
        chunk_size: C; chunk(j) = j // C, every chunk selected, the last one possibly short.
        topk: tokens kept per chunk and head.
        backend: "reference", "torch" (both the torch.topk path), "triton" or None (see `resolve_backend`).

    Returns:
        salient `[B, T, H]` bool, False at invalid positions.
    """
    check_selection_inputs(scores, chunk_size, topk)
    name = resolve_backend(backend, scores.device, available=("reference", "torch", "triton"))
    if name == "triton":
        from .selection_triton import triton_select_salient as select
    else:
        select = torch_select_salient
    return select(scores, chunk_size, topk)


@outside_autocast
def still_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gate: torch.Tensor,
    salient: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    softcap: float | None = None,
    key_valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """STILL hybrid attention: exact softmax over the salient and recent keys, gated linear attention over the rest.

    Args:
        q: RoPE'd queries `[B, T, H, D]`.
        k: RoPE'd keys `[B, T, Hkv, D]`; H must be a multiple of Hkv.
        v: values `[B, T, Hkv, Dv]`.
        q_feat: query features `[B, T, H, F]` (NP-Map), positive.
        k_feat: key features `[B, T, H, F]`, positive, per query head (K is GQA-expanded before the feature map).
        gate: output gate of the linear numerator `[B, T, H, Dv]`, in (0, 1).
        salient: `[B, T, H]` bool (e.g. from `select_salient`); no gradient.
        chunk_size: C; chunk(j) = j // C.
        scale: logit multiplier, default D ** -0.5.
        softcap: if set, every softmax logit z becomes softcap * tanh(z / softcap) before masking (Gemma 2); not on
            the Triton path, so CUDA tensors then default to "torch".
        key_valid: `[B, T]` bool, False at padding; None means all valid.
        eps: added to the denominator.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`).

    Returns:
        o `[B, T, H, Dv]` in q.dtype, accumulated in fp32 (float64 on the reference path).
    """
    check_inputs(q, k, v, q_feat, k_feat, gate, salient, chunk_size, key_valid)
    name = resolve_backend(
        backend, q.device, available=("reference", "torch", "triton"), unsupported=softcap_unsupported(softcap)
    )
    args = (q, k, v, q_feat, k_feat, gate, salient, chunk_size, scale)
    if name == "triton":
        from .attention_triton import triton_still_attention

        return triton_still_attention(*args, key_valid, eps)
    attend = naive_still_attention if name == "reference" else chunk_still_attention
    return attend(*args, softcap, key_valid, eps)


@outside_autocast
def still_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    gate: torch.Tensor,
    valid: torch.Tensor,
    cache: StillDecodeState,
    k_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 64,
    topk: int = 4,
    scale: float | None = None,
    softcap: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, StillDecodeState]:
    """One STILL decode step for one new token per row (module docstring, 4.; formulas in `naive_still_decode`).

    Args:
        q: RoPE'd query of the new token `[B, H, D]`.
        k: its RoPE'd key `[B, Hkv, D]`; H must be a multiple of Hkv.
        v: its value `[B, Hkv, Dv]`.
        q_feat: its query features `[B, H, F]` (NP-Map), positive.
        gate: its output gate of the linear numerator `[B, H, Dv]`, in (0, 1).
        valid: `[B]` bool, False where the token is padding (the cache is then left as it is).
        cache: the decode cache before this token. The torch and triton paths update it in place (a step then
            costs the same at every context); the reference returns a new one. Keep only the returned cache.
        k_features: the key feature map, applied to the GQA-expanded keys of a chunk leaving the ring:
            `[B, C, H, D]` -> `[B, C, H, F]` (used in fp32).
        chunk_size: C.
        topk: tokens of a chunk kept exact per head (1 <= topk <= C).
        scale: logit multiplier, default D ** -0.5.
        softcap: if set, every softmax logit z becomes softcap * tanh(z / softcap) (Gemma 2); the saliency scores
            of a chunk the step completes are not capped. Every backend takes it: the "triton" step is the torch
            one with the Triton top-k selection, which reads scores only.
        eps: added to the denominator.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`).

    Returns:
        o `[B, H, Dv]` in q.dtype, accumulated in fp32, and the cache after this token.
    """
    check_decode_inputs(q, k, v, q_feat, gate, valid, cache, chunk_size, topk)
    softcap_unsupported(softcap)  # rejects a cap <= 0; no backend of this op is ruled out by a cap
    name = resolve_backend(backend, q.device, available=("reference", "torch", "triton"))
    args = (q, k, v, q_feat, gate, valid, cache, k_features, chunk_size, topk, scale, softcap, eps)
    if name == "reference":
        return naive_still_decode(*args)
    select = torch_select_salient
    if name == "triton":
        from .selection_triton import triton_select_salient as select
    return torch_still_decode(*args, select=select)
