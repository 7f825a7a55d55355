"""Liger attention: gated linear branch plus sliding-window softmax branch, mixed. Two ops, each with reference,
PyTorch and Triton paths: `liger_attention` over a sequence (prefill and training, differentiable), on either
backend the gated linear attention op and the sliding-window op composed, then the mix; and `liger_decode`, one new
token per sequence, on Triton one fused kernel (state update and readout, window softmax and mix in one launch).

The Triton modules are imported only when the "triton" backend runs, so CPU-only installs never import triton.
"""

import torch

from ..backend import outside_autocast, resolve_backend, softcap_unsupported
from .attention_torch import torch_liger_attention
from .decode_torch import torch_liger_decode
from .reference import MAX_WINDOW, check_attention_inputs, naive_liger_attention, naive_liger_decode

__all__ = [
    "liger_attention",
    "liger_decode",
    "naive_liger_attention",
    "naive_liger_decode",
    "torch_liger_attention",
    "torch_liger_decode",
]


@outside_autocast
def liger_decode(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    q_rot: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    window_valid: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    mix: float = 0.5,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Liger decode step for one new token per sequence.

    new_state = exp(g)[..., None] * state + k_lin[..., None] * v[..., None, :] (per key head);
    o_linear[b, h] = new_state[b, h // G]^T q_lin[b, h] with G = H // Hkv;
    o_window[b, h] = softmax over the valid window keys j of scale * q_rot[b, h] . window_k[b, j, h // G] (capped
    to softcap * tanh(. / softcap) when softcap is set), applied to window_v (zeros if no key is valid);
    o = mix * o_window + (1 - mix) * o_linear, accumulated in fp32.

    Args:
        q_lin: feature-mapped (softmaxed) queries `[B, H, K]`.
        k_lin: feature-mapped keys `[B, Hkv, K]`; H must be a multiple of Hkv.
        v: values `[B, Hkv, V]`.
        g: per-key-dimension log decay `[B, Hkv, K]`, <= 0.
        state: gated linear state `[B, Hkv, K, V]` (fp32) before this token, shared by the query heads of a group.
        q_rot: RoPE'd queries `[B, H, D]`, with D == V.
        window_k: RoPE'd keys `[B, W, Hkv, D]`: the previous W - 1 tokens' and the new token's, in any order (one
            query's softmax does not depend on it: a cache passes its ring as it lies).
        window_v: values `[B, W, Hkv, D]`, in the same order.
        window_valid: `[B, W]` bool, False for keys nobody may see (padding, not yet filled).
        scale: window score multiplier, default D ** -0.5.
        softcap: if set, every window score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2);
            not on the Triton path, so CUDA tensors then default to "torch".
        mix: weight of the window branch; the linear branch gets 1 - mix.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`). The Triton kernel holds at most
            `MAX_WINDOW` window keys: with more, CUDA tensors default to "torch" too.

    Returns:
        o `[B, H, V]` in q_rot.dtype, and the new state `[B, Hkv, K, V]` in fp32.
    """
    _check_shapes(q_lin, k_lin, v, g, state, q_rot, window_k, window_v, window_valid)
    unsupported = softcap_unsupported(softcap)
    if window_k.shape[1] > MAX_WINDOW:
        unsupported["triton"] = (
            f"the Triton Liger decode kernel holds at most {MAX_WINDOW} window keys, got {window_k.shape[1]}; "
            "use backend 'torch'"
        )
    name = resolve_backend(backend, q_rot.device, available=("reference", "torch", "triton"), unsupported=unsupported)
    args = (q_lin, k_lin, v, g, state, q_rot, window_k, window_v, window_valid)
    if name == "triton":
        from .triton import triton_liger_decode

        return triton_liger_decode(*args, scale=scale, mix=mix)
    fn = naive_liger_decode if name == "reference" else torch_liger_decode
    return fn(*args, scale=scale, softcap=softcap, mix=mix)


def _check_shapes(q_lin, k_lin, v, g, state, q_rot, window_k, window_v, window_valid) -> None:
    ok = q_lin.dim() == 3 and k_lin.dim() == 3 and v.dim() == 3 and window_k.dim() == 4
    if ok:
        (B, H, K), Hkv, V, W = q_lin.shape, k_lin.shape[1], v.shape[2], window_k.shape[1]
        ok = (
            W >= 1
            and Hkv >= 1
            and H % Hkv == 0
            and k_lin.shape == g.shape == (B, Hkv, K)
            and v.shape == (B, Hkv, V)
            and state.shape == (B, Hkv, K, V)
            and q_rot.shape == (B, H, V)
            and window_k.shape == window_v.shape == (B, W, Hkv, V)
            and window_valid.shape == (B, W)
            and window_valid.dtype == torch.bool
        )
    if not ok:
        raise ValueError(
            "expected q_lin [B, H, K], k_lin and g [B, Hkv, K], v [B, Hkv, V], state [B, Hkv, K, V], q_rot [B, H, D], "
            "window_k and window_v [B, W, Hkv, D], window_valid [B, W] bool, with H % Hkv == 0, D == V and W >= 1; "
            f"got q_lin {tuple(q_lin.shape)}, k_lin {tuple(k_lin.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"state {tuple(state.shape)}, q_rot {tuple(q_rot.shape)}, window_k {tuple(window_k.shape)}, "
            f"window_v {tuple(window_v.shape)}, window_valid {tuple(window_valid.shape)} {window_valid.dtype}"
        )


@outside_autocast
def liger_attention(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    *,
    window: int = 64,
    key_valid: torch.Tensor | None = None,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    mix: float = 0.5,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention over a sequence: o = mix * o_window + (1 - mix) * o_linear, v shared by both branches.

    o_linear is `gated_linear_attention(q_lin, k_lin, v, g, scale=1, initial_state=...)`: S_t = diag(exp(g_t)) S_{t-1}
    + k_lin_t v_t^T, o_linear_t = S_t^T q_lin_t. o_window is `sliding_window_attention` of q_rot over the keys
    [past_k, k_rot] and values [past_v, v]: query t sits at key position P + t and sees key j iff
    P + t - window < j <= P + t and key_valid[b, j] (zeros if it sees none). key_valid masks the window branch only:
    to keep padding out of the linear state, pass v zeroed there (the state before left padding is zero anyway).

    Args:
        q_lin: feature-mapped queries `[B, T, H, K]`.
        k_lin: feature-mapped keys `[B, T, Hkv, K]`; H must be a multiple of Hkv, query head h reads key head
            h // (H // Hkv) in both branches.
        v: values `[B, T, Hkv, D]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        q_rot: RoPE'd queries `[B, T, H, D]`.
        k_rot: RoPE'd keys `[B, T, Hkv, D]`.
        window: keys visible per query, counting its own token (>= 1).
        key_valid: `[B, P + T]` bool, False for window keys nobody may see (padding); None means all valid.
        past_k: RoPE'd keys of the P cached tokens before these `[B, P, Hkv, D]`, or None.
        past_v: their values `[B, P, Hkv, D]`, given together with past_k.
        scale: window score multiplier, default D ** -0.5.
        softcap: if set, every window score s becomes softcap * tanh(s / softcap) before masking and softmax
            (Gemma 2); not on the Triton path, so CUDA tensors then default to "torch".
        mix: weight of the window branch; the linear branch gets 1 - mix.
        initial_state: `[B, Hkv, K, D]` fp32 linear state before the first token, or None for zeros.
        output_final_state: whether to return the linear state after the last token.
        backend: "reference", "torch", "triton" or None (see `resolve_backend`; CUDA tensors default to "triton").

    Returns:
        o `[B, T, H, D]` in q_rot.dtype (mixed in fp32), and the final state `[B, Hkv, K, D]` in fp32 or None.
    """
    check_attention_inputs(q_lin, k_lin, v, g, q_rot, k_rot, window, key_valid, past_k, past_v, initial_state)
    name = resolve_backend(
        backend, q_rot.device, available=("reference", "torch", "triton"), unsupported=softcap_unsupported(softcap)
    )
    options = {} if softcap is None else {"softcap": softcap}  # only the reference and torch paths take a cap
    if name == "reference":
        fn = naive_liger_attention
    elif name == "torch":
        fn = torch_liger_attention
    else:
        from .attention_triton import triton_liger_attention as fn
    return fn(
        q_lin,
        k_lin,
        v,
        g,
        q_rot,
        k_rot,
        window=window,
        key_valid=key_valid,
        past_k=past_k,
        past_v=past_v,
        scale=scale,
        mix=mix,
        initial_state=initial_state,
        output_final_state=output_final_state,
        **options,
    )
