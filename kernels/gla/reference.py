"""Token-by-token GLA oracle: slow, fp32, written to be obviously correct."""

import torch


def check_inputs(q, k, v, g, initial_state=None, cu_seqlens=None) -> int:
    """Raise a ValueError naming the problem when the arguments do not fit the op's shapes (see the dispatcher).

    Returns N, the number of sequences: B, or the number of packed sequences with cu_seqlens.
    """
    if any(x.ndim != 4 for x in (q, k, v, g)):
        raise ValueError(
            f"expected 4-D q, k, v and g [B, T, heads, dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(g.shape)}"
        )
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q, k, v and g hold no tokens (T = 0)")
    Hkv, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None and cu_seqlens is not None and initial_state.shape[0] != N:
        raise ValueError(
            f"with cu_seqlens, initial_state must hold one state per sequence: [N = {N}, Hkv, K, V], got "
            f"{tuple(initial_state.shape)}"
        )
    state_ok = initial_state is None or initial_state.shape == (N, Hkv, K, V)
    if H % Hkv or g.shape != k.shape or k.shape != (B, T, Hkv, K) or v.shape[:2] != (B, T) or not state_ok:
        raise ValueError(
            "expected q [B, T, H, K], k and g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V] (N = B, "
            "or the number of sequences with cu_seqlens) with H % Hkv == 0, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"initial_state {None if initial_state is None else tuple(initial_state.shape)}"
        )
    return N


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention as the plain recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros. The state depends only
            on k, v and g, so the query heads of a group share it.
        output_final_state: whether to return the state after the last token.
        cu_seqlens: optional `[N + 1]` boundaries of N sequences packed along T (B must be 1); the state restarts
            at each one, initial_state and the final state are then `[N, Hkv, K, V]`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None.
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        return varlen_loop(naive_recurrent_gla, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    Hkv = k.shape[2]
    k, v, g = (x.float() for x in (k, v, g))
    S = k.new_zeros(B, Hkv, K, V) if initial_state is None else initial_state.float()
    o = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        # query head h reads the state of its key head h // (H // Hkv)
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S.repeat_interleave(H // Hkv, dim=1)))
    return torch.stack(o, dim=1).to(q.dtype), (S if output_final_state else None)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> int:
    """Validate packed-batch boundaries `[N + 1]` (0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = T) for a batch of one.

    Returns N, the number of sequences. Reads the boundaries on the host (a device sync on CUDA).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 or int64 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B = {B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T} without decreasing, got {cu}")
    return len(cu) - 1


def varlen_loop(
    fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fixed-length GLA `fn` on each packed sequence of `cu_seqlens` (shapes already checked).

    Returns o `[1, T, H, V]` and the final states `[N, Hkv, K, V]` (fp32) or None.
    """
    Hkv, K, V = k.shape[2], k.shape[3], v.shape[3]
    cu = cu_seqlens.tolist()
    outputs, states = [], []
    for n, (bos, eos) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        if eos == bos:  # an empty sequence passes its state through
            outputs.append(q.new_empty(1, 0, q.shape[2], V))
            states.append(k.new_zeros(1, Hkv, K, V, dtype=torch.float32) if h0 is None else h0.float())
            continue
        part = slice(bos, eos)
        o, S = fn(
            q[:, part], k[:, part], v[:, part], g[:, part], scale=scale, initial_state=h0, output_final_state=True
        )
        outputs.append(o)
        states.append(S)
    return torch.cat(outputs, dim=1), (torch.cat(states, dim=0) if output_final_state else None)
